"""sepconv: fused depthwise-separable convolution kernels for PyTorch.

    y = act(W_pw . act_mid(dw(x) + b_dw) + b_pw)     in one kernel per direction

Data flows one way: SeparableConv2d -> separable_conv2d -> torch.ops.sepconv.* ->
sepconv._C (CPU, float32/float64), sepconv.triton_kernels (CUDA, float16/bfloat16/
float32) or the PyTorch reference (every other case).
"""

__version__ = "0.1.0"

from . import models  # noqa: E402
from ._backend import backend_info, set_flush_denormal, set_huge_pages, use_backend  # noqa: E402
from .complexity import ComplexityReport, complexity  # noqa: E402
from .convert import FuseReport, SeparateReport, from_conv2d, fuse, separate  # noqa: E402
from .functional import depthwise_mean, separable_conv2d  # noqa: E402
from .modules import Excitation, SeparableConv2d  # noqa: E402

__all__ = ["SeparableConv2d", "Excitation", "separable_conv2d", "depthwise_mean", "use_backend",
           "backend_info",
           "set_flush_denormal", "set_huge_pages", "fuse", "from_conv2d", "separate",
           "complexity", "models",
           "FuseReport", "SeparateReport", "ComplexityReport", "__version__"]
