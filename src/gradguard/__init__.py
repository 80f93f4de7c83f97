"""gradguard: keep PyTorch training safe from exploding and vanishing gradients.

Measure (``norms``), act (``clip``), guard a step (``guard``), diagnose a model (``diagnose``)
and show what happened (``records``, ``report``, the ``gradguard`` CLI).
"""

from gradguard import report as report
from gradguard.core.agc import agc_ as agc_
from gradguard.core.agc import agc_parameters as agc_parameters
from gradguard.core.buffer import ContiguousGrads as ContiguousGrads
from gradguard.core.clip import clip_by_global_norm as clip_by_global_norm
from gradguard.core.clip import clip_by_norm as clip_by_norm
from gradguard.core.clip import clip_by_norm_ as clip_by_norm_
from gradguard.core.clip import clip_by_value as clip_by_value
from gradguard.core.clip import clip_coefficient as clip_coefficient
from gradguard.core.clip import clip_grad_norm_ as clip_grad_norm_
from gradguard.core.clip import clip_grad_value_ as clip_grad_value_
from gradguard.core.clip import clip_grads_with_norm_ as clip_grads_with_norm_
from gradguard.core.norms import GradNorms as GradNorms
from gradguard.core.norms import get_total_norm as get_total_norm
from gradguard.core.norms import grad_norms as grad_norms
from gradguard.core.norms import tensor_norms as tensor_norms
from gradguard.core.snapshot import SnapshotError as SnapshotError
from gradguard.core.snapshot import SnapshotStore as SnapshotStore
from gradguard.decide.detect import Detection as Detection
from gradguard.decide.detect import Detector as Detector
from gradguard.decide.detect import DivergenceDetector as DivergenceDetector
from gradguard.decide.detect import NonFiniteDetector as NonFiniteDetector
from gradguard.decide.detect import RatioSpikeDetector as RatioSpikeDetector
from gradguard.decide.detect import Signals as Signals
from gradguard.decide.detect import SpikeDetector as SpikeDetector
from gradguard.decide.detect import UpdateRatioDetector as UpdateRatioDetector
from gradguard.decide.detect import VanishingDetector as VanishingDetector
from gradguard.decide.policies import AGCPolicy as AGCPolicy
from gradguard.decide.policies import ClipPolicy as ClipPolicy
from gradguard.decide.policies import EMARatioClip as EMARatioClip
from gradguard.decide.policies import FixedThreshold as FixedThreshold
from gradguard.decide.policies import MedianClip as MedianClip
from gradguard.decide.policies import QuantileClip as QuantileClip
from gradguard.decide.policies import ZScoreClip as ZScoreClip
from gradguard.guard.guard import Guard as Guard
from gradguard.guard.guard import GuardConfig as GuardConfig
from gradguard.guard.guard import Stage as Stage
from gradguard.guard.guard import StepReport as StepReport
from gradguard.guard.incident import IncidentWriter as IncidentWriter
from gradguard.guard.response import Budgets as Budgets
from gradguard.guard.response import GuardAbort as GuardAbort
from gradguard.guard.rollback import SkipSampler as SkipSampler
from gradguard.insight import remedies as remedies
from gradguard.insight.diagnose import Diagnosis as Diagnosis
from gradguard.insight.diagnose import diagnose as diagnose
from gradguard.insight.probe import NonFiniteOrigin as NonFiniteOrigin
from gradguard.insight.probe import Probe as Probe
from gradguard.insight.replay import Replay as Replay
from gradguard.insight.replay import replay as replay
from gradguard.records.bundle import Bundle as Bundle
from gradguard.records.bundle import BundleError as BundleError
from gradguard.records.bundle import BundleSpec as BundleSpec
from gradguard.records.bundle import load_bundle as load_bundle
from gradguard.records.recorder import Recorder as Recorder
from gradguard.records.sinks import ConsoleSink as ConsoleSink
from gradguard.records.sinks import CsvSink as CsvSink
from gradguard.records.sinks import JsonlSink as JsonlSink
from gradguard.records.sinks import MlflowSink as MlflowSink
from gradguard.records.sinks import TensorBoardSink as TensorBoardSink
from gradguard.records.sinks import WandbSink as WandbSink
from gradguard.records.sinks import read_csv as read_csv
from gradguard.records.sinks import read_jsonl as read_jsonl

# The one place the version is written: pyproject.toml reads it from here (setuptools dynamic).
__version__ = "0.2.0.dev0"
