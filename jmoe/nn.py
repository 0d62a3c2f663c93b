"""Flax NNX modules: thin shells over jmoe's pure functions.

Each module owns its parameters and calls a pure function: `MoE` -> `jmoe.moe_ffn`,
`FeedForward` -> `jmoe.ffn`, `Router` -> `jmoe.route`. No routing or dispatch logic
lives here. `Attention`, `TransformerBlock` and `MoETransformerLM` complete a small
decoder-only language model around the MoE layer.

Conventions: sizes positional, then `*`, then options, `rngs: nnx.Rngs` last.
`dtype` is the compute dtype (None: the input's), `param_dtype` the storage dtype
(float32 by default). Router math is float32 whatever the dtypes.

Sharding is data. Every parameter is an `nnx.Param` (the MoE selection bias an
`ExpertBias`, which is not a Param) carrying the logical names of its axes in its
`out_sharding` metadata:

  "embed"     d_model
  "expert"    the expert axis
  "mlp"       FFN hidden width (experts, shared expert, dense FFN)
  "vocab"     vocabulary
  "q_heads"   query heads;  "kv_heads": key/value heads;  "head_dim": head width
  None        unsharded

`logical_partition_specs(model, rules)` turns them into a tree of mesh
`PartitionSpec`s, `logical_shardings(model, mesh, rules)` into `NamedSharding`s:

  rules = (("expert", "ep"), ("mlp", "tp"))
  shardings = jmoe.nn.logical_shardings(model, mesh, rules)
  nnx.update(model, jax.device_put(nnx.state(model), shardings))

The same with flax's own functions (flax 0.12 has no `nnx.logical_to_mesh_sharding`;
the linen one works on nnx states):

  specs = nnx.get_partition_spec(nnx.state(model))   # logical names as P(...)
  shardings = flax.linen.logical_to_mesh_sharding(specs, mesh, rules)

(Calling `nnx.get_partition_spec` under `nnx.logical_axis_rules(rules)` instead
keeps names without a rule as they are, so there the rules must name every axis:
`complete_rules(rules)`.)

Parameters are created with `eager_sharding=False` by default, so modules build with
or without a mesh. Pass `eager_sharding=True` to create them already sharded; that
needs an active mesh and rules naming every logical axis, e.g.

  with jax.set_mesh(mesh), nnx.logical_axis_rules(complete_rules(rules)):
    model = MoETransformerLM(..., eager_sharding=True, rngs=nnx.Rngs(0))
"""

# pylint: disable=g-importing-member,useless-import-alias
from jmoe._src.nn.attention import Attention as Attention
from jmoe._src.nn.attention import apply_rope as apply_rope
from jmoe._src.nn.attention import rms_norm as rms_norm
from jmoe._src.nn.attention import rope as rope
from jmoe._src.nn.moe import FeedForward as FeedForward
from jmoe._src.nn.moe import MoE as MoE
from jmoe._src.nn.moe import Router as Router
from jmoe._src.nn.sampling import generate as generate
from jmoe._src.nn.sampling import sample_logits as sample_logits
from jmoe._src.nn.transformer import KVCache as KVCache
from jmoe._src.nn.transformer import MoETransformerLM as MoETransformerLM
from jmoe._src.nn.transformer import TransformerBlock as TransformerBlock
from jmoe._src.nn.transformer import moe_layer_pattern as moe_layer_pattern
from jmoe._src.nn.variables import LOGICAL_AXES as LOGICAL_AXES
from jmoe._src.nn.variables import ExpertBias as ExpertBias
from jmoe._src.nn.variables import Initializer as Initializer
from jmoe._src.nn.variables import complete_rules as complete_rules
from jmoe._src.nn.variables import fan_in_init as fan_in_init
from jmoe._src.nn.variables import logical_partition_specs as logical_partition_specs
from jmoe._src.nn.variables import logical_shardings as logical_shardings
from jmoe._src.nn.variables import param as param
