"""gradguard: keep PyTorch training safe from exploding and vanishing gradients.

Measure (``norms``), act (``clip``), guard a step (``guard``), diagnose a model (``diagnose``)
and show what happened (``records``, ``report``, the ``gradguard`` CLI).
"""

from gradguard import remedies as remedies
from gradguard import report as report
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
from gradguard.detect import Detection as Detection
from gradguard.detect import Detector as Detector
from gradguard.detect import DivergenceDetector as DivergenceDetector
from gradguard.detect import NonFiniteDetector as NonFiniteDetector
from gradguard.detect import Signals as Signals
from gradguard.detect import SpikeDetector as SpikeDetector
from gradguard.detect import UpdateRatioDetector as UpdateRatioDetector
from gradguard.detect import VanishingDetector as VanishingDetector
from gradguard.diagnose import Diagnosis as Diagnosis
from gradguard.diagnose import diagnose as diagnose
from gradguard.guard import Guard as Guard
from gradguard.guard import GuardConfig as GuardConfig
from gradguard.guard import Stage as Stage
from gradguard.guard import StepReport as StepReport
from gradguard.incident import Bundle as Bundle
from gradguard.incident import BundleError as BundleError
from gradguard.incident import IncidentWriter as IncidentWriter
from gradguard.incident import load_bundle as load_bundle
from gradguard.norms import GradNorms as GradNorms
from gradguard.norms import get_total_norm as get_total_norm
from gradguard.norms import grad_norms as grad_norms
from gradguard.norms import tensor_norms as tensor_norms
from gradguard.policies import AGCPolicy as AGCPolicy
from gradguard.policies import ClipPolicy as ClipPolicy
from gradguard.policies import EMARatioClip as EMARatioClip
from gradguard.policies import FixedThreshold as FixedThreshold
from gradguard.policies import QuantileClip as QuantileClip
from gradguard.policies import ZScoreClip as ZScoreClip
from gradguard.probe import NonFiniteOrigin as NonFiniteOrigin
from gradguard.probe import Probe as Probe
from gradguard.records import Recorder as Recorder
from gradguard.replay import Replay as Replay
from gradguard.replay import replay as replay
from gradguard.response import Budgets as Budgets
from gradguard.response import GuardAbort as GuardAbort
from gradguard.rollback import SkipSampler as SkipSampler
from gradguard.rollback import SnapshotError as SnapshotError
from gradguard.rollback import SnapshotStore as SnapshotStore
from gradguard.sinks import ConsoleSink as ConsoleSink
from gradguard.sinks import CsvSink as CsvSink
from gradguard.sinks import JsonlSink as JsonlSink
from gradguard.sinks import MlflowSink as MlflowSink
from gradguard.sinks import TensorBoardSink as TensorBoardSink
from gradguard.sinks import WandbSink as WandbSink
from gradguard.sinks import read_csv as read_csv
from gradguard.sinks import read_jsonl as read_jsonl

# The one place the version is written: pyproject.toml reads it from here (setuptools dynamic).
__version__ = "0.2.0.dev0"
