"""jmoe: Mixture-of-Experts layers for JAX.

Pure functions (routing, losses, the prefix-sum dispatch plan, the grouped matmul,
the whole MoE layer) and the MoE layer's parameter table are re-exported here;
Flax NNX modules and the model configs live in `jmoe.nn`, the Linen wrapper in
`jmoe.linen`, expert parallelism in `jmoe.parallel`, checkpoint conversion in
`jmoe.hf`.
"""

from jmoe._src.checks import ShapeDtypeError as ShapeDtypeError
from jmoe._src.gmm.api import IMPLEMENTATIONS as GMM_IMPLEMENTATIONS
from jmoe._src.gmm.api import default_implementation as default_gmm_implementation
from jmoe._src.gmm.api import gmm as gmm
from jmoe._src.moe import CHECKPOINT_NAMES as MOE_CHECKPOINT_NAMES
from jmoe._src.moe import MoEAux as MoEAux
from jmoe._src.moe import MoEConfig as MoEConfig
from jmoe._src.moe import expert_ffn as expert_ffn
from jmoe._src.moe import ffn as ffn
from jmoe._src.moe import moe_ffn as moe_ffn
from jmoe._src.params import ACTIVATIONS as ACTIVATIONS
from jmoe._src.params import FFN_PARAMS as FFN_PARAMS
from jmoe._src.params import MOE_PARAMS as MOE_PARAMS
from jmoe._src.params import Activation as Activation
from jmoe._src.params import FFNParams as FFNParams
from jmoe._src.params import MoELayout as MoELayout
from jmoe._src.params import MoEParams as MoEParams
from jmoe._src.params import ParamSpec as ParamSpec
from jmoe._src.params import init_params as init_params
from jmoe._src.params import upcycle_ffn as upcycle_ffn
from jmoe._src.permute import DispatchPlan as DispatchPlan
from jmoe._src.permute import dispatch_plan as dispatch_plan
from jmoe._src.permute import permute as permute
from jmoe._src.permute import unpermute as unpermute
from jmoe._src.routing import ExpertChoiceRouting as ExpertChoiceRouting
from jmoe._src.routing import ROUTING_KINDS as ROUTING_KINDS
from jmoe._src.routing import RouterConfig as RouterConfig
from jmoe._src.routing import Routing as Routing
from jmoe._src.routing import RoutingKind as RoutingKind
from jmoe._src.routing import expert_capacity as expert_capacity
from jmoe._src.routing import load_balancing_loss as load_balancing_loss
from jmoe._src.routing import route as route
from jmoe._src.routing import router_z_loss as router_z_loss
from jmoe._src.routing import update_expert_bias as update_expert_bias

__version__ = "0.1.0"
