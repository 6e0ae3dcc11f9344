"""Pure forward/backward ops over NumPy or CuPy arrays (the op contract).

    y, cache = <op>_forward(x, <params...>, <hyper-params...>)
    dx, d<param1>, ... = <op>_backward(dy, cache)

Gradients come back in the order of the forward's array arguments; each
backward's docstring states its formula.  One module per op family.
"""
from .conv import *          # noqa: F401,F403  conv2d
from .linear import *        # noqa: F401,F403  linear
from .activations import *   # noqa: F401,F403  relu
from .pooling import *       # noqa: F401,F403  max_pool2d, avg_pool2d
from .loss import *          # noqa: F401,F403  softmax_cross_entropy
from .dropout import *       # noqa: F401,F403  dropout
from .batchnorm import *     # noqa: F401,F403  batch_norm, mean_only_batch_norm, batch_renorm
from .weightnorm import *    # noqa: F401,F403  weight_norm
from .normprop import *      # noqa: F401,F403  normprop_relu
from .trelu import *         # noqa: F401,F403  trelu
from .layernorm import *     # noqa: F401,F403  layer_norm, group_norm
