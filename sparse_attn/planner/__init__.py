"""Per-head attention plans: offline calibration, a budgeted choice per (layer, head), a versioned JSON format.

    profile = calibrate(model, prompts)                    # measure every candidate on every (layer, head)
    plan = make_plan(profile, target_density=0.3)          # choose one per head under the budget
    plan.save("plan.json")                                 # docs/PLAN_FORMAT.md
    sparse_attn.configure(model, plan="plan.json")                # checked against the model

Without a plan, :func:`default_pattern` is the content-aware choice for every head.
"""

from ..patterns import default_pattern
from .calibrate import Candidate, Profile, calibrate, calibration_prompts, default_candidates, profile_layer
from .plan import PLAN_FORMAT, PLAN_VERSION, PATTERNS, HeadSetting, ModelShape, Plan, PlanError, build_pattern, load_plan
from .render import render_plan
from .solver import KernelTimeModel, choose, make_plan

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "PATTERNS", "HeadSetting", "ModelShape", "Plan", "PlanError", "build_pattern",
           "load_plan", "Candidate", "Profile", "calibrate", "calibration_prompts", "default_candidates",
           "profile_layer", "KernelTimeModel", "choose", "make_plan", "render_plan", "default_pattern"]

