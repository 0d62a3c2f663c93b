"""Flax NNX modules: thin shells over jmoe's pure functions.

Each module owns its parameters and calls a pure function: `MoE` -> `jmoe.moe_ffn`,
`FeedForward` -> `jmoe.ffn`, `Router` -> `jmoe.route`. No routing or dispatch logic
lives here. `Attention`, `TransformerBlock` and `MoETransformerLM` complete a small
decoder-only language model around the MoE layer; `generate` samples from it.

Configuration is data: `AttentionConfig` holds the attention options,
`TransformerConfig` the whole model's (with presets such as
`TransformerConfig.mixtral_8x7b()`), and the MoE layer's parameters are the rows of
`jmoe.MOE_PARAMS`. Modules take them: `MoETransformerLM(config, rngs=...)`.

Conventions: sizes positional, then `*`, then options, `rngs: nnx.Rngs` last.
`dtype` is the compute dtype (None: the input's), `param_dtype` the storage dtype
(float32 by default). Router math is float32 whatever the dtypes.

Every parameter carries the logical names of its axes ("embed", "expert", "mlp",
"vocab", "q_heads", "kv_heads", "head_dim"); `logical_partition_specs(model, rules)`
and `logical_shardings(model, mesh, rules)` turn them into mesh shardings (see
`jmoe/_src/nn/variables.py` for the details and `eager_sharding`). The MoE layer's
input and output take the logical activation names `ACTIVATION_AXES`
("activation_batch", "activation_length", "activation_embed"): under
`nnx.logical_axis_rules(rules)` and `jax.set_mesh(mesh)` they are constrained to
the mesh axes the rules give them.

Aux the Flax way: each `MoE` returns its `jmoe.MoEAux` and sows it ("moe_aux", an
`nnx.Intermediate`) inside `nnx.capture`; `collect_aux` stacks a whole model's
records, `total_aux_loss` weights them into one loss, `update_router_biases` steps
every router bias of any model from them (`jmoe/_src/nn/aux.py`). Router noise
comes from the module's `nnx.Rngs` stream unless `deterministic` (as
`nnx.Dropout`; `model.eval()` switches it off), or from an explicit `key`.

Where each idea lives: `jmoe/_src/nn/variables.py` (parameters with logical axes,
sharding helpers), `moe.py` (Router, FeedForward, MoE), `attention.py`
(AttentionConfig, Attention, RoPE), `transformer.py` (TransformerConfig,
TransformerBlock, MoETransformerLM, KVCache) and `sampling.py` (sample_logits,
generate).
"""

# pylint: disable=g-importing-member,useless-import-alias
from jmoe._src.nn.aux import collect_aux as collect_aux
from jmoe._src.nn.aux import moe_layers as moe_layers
from jmoe._src.nn.aux import total_aux_loss as total_aux_loss
from jmoe._src.nn.aux import update_router_biases as update_router_biases
from jmoe._src.nn.attention import Attention as Attention
from jmoe._src.nn.attention import AttentionConfig as AttentionConfig
from jmoe._src.nn.attention import apply_rope as apply_rope
from jmoe._src.nn.attention import rms_norm as rms_norm
from jmoe._src.nn.attention import rope as rope
from jmoe._src.nn.moe import AUX_NAME as AUX_NAME
from jmoe._src.nn.moe import FeedForward as FeedForward
from jmoe._src.nn.moe import MoE as MoE
from jmoe._src.nn.moe import Router as Router
from jmoe._src.nn.sampling import generate as generate
from jmoe._src.nn.sampling import sample_logits as sample_logits
from jmoe._src.nn.transformer import KVCache as KVCache
from jmoe._src.nn.transformer import MoETransformerLM as MoETransformerLM
from jmoe._src.nn.transformer import TransformerBlock as TransformerBlock
from jmoe._src.nn.transformer import TransformerConfig as TransformerConfig
from jmoe._src.nn.transformer import moe_layer_pattern as moe_layer_pattern
from jmoe._src.nn.variables import ACTIVATION_AXES as ACTIVATION_AXES
from jmoe._src.nn.variables import LOGICAL_AXES as LOGICAL_AXES
from jmoe._src.nn.variables import ExpertBias as ExpertBias
from jmoe._src.nn.variables import Initializer as Initializer
from jmoe._src.nn.variables import complete_rules as complete_rules
from jmoe._src.nn.variables import fan_in_init as fan_in_init
from jmoe._src.nn.variables import logical_partition_specs as logical_partition_specs
from jmoe._src.nn.variables import logical_shardings as logical_shardings
from jmoe._src.nn.variables import param as param
