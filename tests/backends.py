"""Where the tests run: the device, and which op backends can run there (Triton on a GPU or under its interpreter);
and the float64 oracles and plan-file helpers shared by several test modules."""

import pytest
import torch

from sparse_attn.ops.attention import triton_interpreter_enabled, triton_kernels
from sparse_attn.ops.reference import attention_reference_varlen

ON_GPU = torch.cuda.is_available() and not triton_interpreter_enabled()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
TRITON_RUNS = triton_kernels() is not None and (ON_GPU or triton_interpreter_enabled())
BACKENDS = ["cpu", pytest.param("triton", marks=pytest.mark.skipif(not TRITON_RUNS, reason="triton cannot run here"))]


def pruned_reference(q, keys, values, scale):
    """Float64 oracle: q [B, Hq, D]; keys/values per sequence [Hkv, L_b, D] (already pruned as stored)."""
    cu = [0]
    for k in keys:
        cu.append(cu[-1] + k.shape[1])
    k = torch.cat([k.transpose(0, 1) for k in keys]).double()
    v = torch.cat([v.transpose(0, 1) for v in values]).double()
    out, lse = attention_reference_varlen(q.double(), k, v, list(range(q.shape[0] + 1)), cu, None, False, scale,
                                          compute_dtype=torch.float64)
    return out, lse.transpose(0, 1)


def set_field(data, path: tuple, value):
    """``data`` (nested dicts and lists, e.g. a plan file's JSON) with the field at ``path`` set to ``value`` in place
    (deleted when ``value`` is KeyError); returns ``data``."""
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return data
