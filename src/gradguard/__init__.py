"""gradguard: keep PyTorch training safe from exploding and vanishing gradients.

Measure (``norms``), act (``clip``), guard a step (``guard``), diagnose a model (``diagnose``)
and show what happened (``records``, ``report``, the ``gradguard`` CLI).
"""

from gradguard.agc import agc_ as agc_
from gradguard.agc import agc_parameters as agc_parameters
from gradguard.buffer import ContiguousGrads as ContiguousGrads
from gradguard.clip import clip_by_global_norm as clip_by_global_norm
from gradguard.clip import clip_by_norm as clip_by_norm
from gradguard.clip import clip_by_norm_ as clip_by_norm_
from gradguard.clip import clip_by_value as clip_by_value
from gradguard.clip import clip_coefficient as clip_coefficient
from gradguard.clip import clip_grad_norm_ as clip_grad_norm_
from gradguard.clip import clip_grad_value_ as clip_grad_value_
from gradguard.clip import clip_grads_with_norm_ as clip_grads_with_norm_
from gradguard.norms import GradNorms as GradNorms
from gradguard.norms import get_total_norm as get_total_norm
from gradguard.norms import grad_norms as grad_norms
from gradguard.norms import tensor_norms as tensor_norms

__version__ = "0.1.0"
