"""Per-head attention plans: offline calibration, a budgeted choice per (layer, head), a versioned JSON format.

    profile = calibrate(model, prompts)                    # measure every candidate on every (layer, head)
    plan = make_plan(profile, target_density=0.3)          # choose one per head under the budget
    plan.save("plan.json")                                 # docs/PLAN_FORMAT.md
    sparse_attn.configure(model, plan="plan.json")                # checked against the model

Without a plan, :func:`default_pattern` is the content-aware choice for every head. :data:`SMOLLM2_PLAN` is a plan
for the embedded SmolLM2-135M-Instruct at 0.30 prefill density, the one ``bench/results/accuracy_plan/`` measured.
"""

from pathlib import Path

from ..patterns import default_pattern
from .calibrate import Candidate, Profile, calibrate, calibration_prompts, default_candidates, profile_layer
from .plan import PLAN_FORMAT, PLAN_VERSION, PATTERNS, HeadSetting, ModelShape, Plan, PlanError, build_pattern, load_plan
from .render import render_plan
from .solver import KernelTimeModel, choose, make_plan

#: ``sparse-attn-plan calibrate --model smollm2 --target-density 0.3`` on licence texts held out from the
#: perplexity texts of ``python -m bench.accuracy_plan``.
SMOLLM2_PLAN = Path(__file__).parent / "plans" / "SmolLM2-135M-Instruct-d30.json"

__all__ = ["SMOLLM2_PLAN", "PLAN_FORMAT", "PLAN_VERSION", "PATTERNS", "HeadSetting", "ModelShape", "Plan", "PlanError",
           "build_pattern",
           "load_plan", "Candidate", "Profile", "calibrate", "calibration_prompts", "default_candidates",
           "profile_layer", "KernelTimeModel", "choose", "make_plan", "render_plan", "default_pattern"]

