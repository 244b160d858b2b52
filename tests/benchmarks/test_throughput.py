"""Training throughput (images/s) of the main-stage step, for the standard CIFAR-100 pairs and
every registered method, at batch 64 and 128, on the best device here — and from it, how long
the 5 methods × 5 seeds wrn_40_2 → wrn_16_2 table would take on this device (issue 7).

The step is test_method_overhead's ``main_step`` (the engine's pieces in train.py's order:
taps, teacher under no_grad, CE × ce_weight, the method's loss and gradient rule, SGD), run with
the choices train.py makes on the device: on CUDA channels_last networks and batches, bf16
autocast around the networks' forward passes only (losses in fp32 from ``as_float32``),
cuDNN benchmark, no TF32 (as train.py); on the CPU fp32. The batch is fixed random CIFAR-shaped data (32 px,
100 classes): the data pipeline is test_data_pipeline's, and the loop's per-step device-side
bookkeeping and per-epoch checkpoint are the framework benchmark's, so neither is in these
figures.

Unlike the other benchmarks this one reports rates, not an interleaved ratio: on a GPU lent
for a few minutes there is nothing to alternate with. The ratio it reports beside the rate is
each method's step time over the student alone at the same pair and batch (the Student row's
cost), and for the table the whole table over one teacher run. On CUDA every timed round ends
with ``torch.cuda.synchronize`` (kernels are asynchronous), the GPU's utilisation is sampled
with NVML during the timed rounds (skipped when nvidia-ml-py is missing), and the model FLOPs of
one step are counted (torch.utils.flop_counter: convolutions and matrix products) to give the
achieved TFLOP/s.

Sizes: on CUDA every pair × batch × method (≈ 2 s each); on the CPU (--benchmark-enable) only
wrn_40_2 → wrn_16_2 at the common recipe's batch of 64, a warm-up and 2 timed steps per method
(one such step is 0.5–5 s on one core of the 2-core VM; ≈ 2 min for the file); the other cases skip, naming why. With
--benchmark-disable (CI) every pair and method runs one step at batch 4: a smoke test that the
steps run and the losses are finite, its rates marked as not a measurement.
"""

from __future__ import annotations

import math
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from kdbench import registry, settings
from kdbench.method import Batch, Method, Progress, iter_parameters
from kdbench.models import build_model
from kdbench.taps import FeatureTaps
from kdbench.train import EVAL_BATCH, build_optimizer, parameters_feeding, shapes_of
from test_method_overhead import main_step, pretrain_step, registered_method

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE.type == "cuda"
# train.py's defaults on this device: bf16 autocast and channels_last on CUDA, fp32 on the CPU.
PRECISION = "bf16" if ON_CUDA else "fp32"
CHANNELS_LAST = ON_CUDA

NUM_CLASSES, CHANNELS, IMAGE_SIZE = 100, 3, 32  # CIFAR-100's shapes
RECIPE = settings.COMMON_CIFAR
NUM_TRAIN, NUM_TEST = 50000, 10000  # CIFAR-100's splits
# The standard pairs: RepDistiller's CIFAR-100 table columns, i.e. the settings on the common
# recipe (the MHGD pair runs the authors' recipe and is not one of them).
PAIRS = [(s.teacher, s.student) for s in settings.SETTINGS.values()
         if s.dataset == "cifar100" and s.recipe == RECIPE]
DEFAULT = settings.get(settings.DEFAULT_SETTING)
DEFAULT_PAIR = (DEFAULT.teacher, DEFAULT.student)
BATCHES = (RECIPE.batch_size, 2 * RECIPE.batch_size)  # 64 (the recipe's) and 128
STUDENT_ALONE = "vanilla"
# The Student row first: every other method's step is reported relative to it.
METHODS = sorted(registry.names(), key=lambda name: (name != STUDENT_ALONE, name))
TABLE_SEEDS = 5

SMOKE_BATCH = 4  # --benchmark-disable: one step per case, only to check it runs
if ON_CUDA:
    # Enough steps that cuDNN's autotuning is over, then rounds of ≥ 0.25 s each (NVML's
    # utilisation sample period is 1/6 s to 1 s): ≈ 1.3 s timed per case.
    WARMUP_STEPS, ROUNDS, ROUND_SECONDS, MAX_STEPS_PER_ROUND = 10, 5, 0.25, 500
else:
    # One step is 0.5-6 s on one core of the 2-core VM: one warm-up step, two timed.
    WARMUP_STEPS, ROUNDS, ROUND_SECONDS, MAX_STEPS_PER_ROUND = 1, 2, 0.0, 1
# train.evaluate's test batch of 1000 on CUDA; on a CPU the rate hardly depends on it.
EVAL_BATCH_HERE = EVAL_BATCH if ON_CUDA else 64
# Dense bf16 tensor-core peak (NVIDIA's data sheets), to put the achieved TFLOP/s in context.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


# --- the step, as train.py takes it on this device -------------------------------------------

class UnderAutocast(nn.Module):
    """``model``'s forward pass under bf16 autocast: train.py wraps the networks' forward
    passes only, and main_step computes every loss outside, from fp32 copies of the taps."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return self.model(images)


def as_run(model: nn.Module | None, precision: str = PRECISION) -> nn.Module | None:
    return UnderAutocast(model) if model is not None and precision == "bf16" else model


def random_batch(batch_size: int) -> Batch:
    images = torch.randn(batch_size, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, device=DEVICE)
    if CHANNELS_LAST:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=DEVICE)
    return Batch(images, labels, torch.arange(batch_size, device=DEVICE))


def network(arch: str) -> nn.Module:
    model = build_model(arch, NUM_CLASSES, CHANNELS).to(DEVICE)
    return model.to(memory_format=torch.channels_last) if CHANNELS_LAST else model


@dataclass
class Trainee:
    """One method on one pair, built as train.py builds it, with a step on a fixed batch for
    its main stage and for each of its pre-training stages (name → (epochs, step))."""

    method: Method
    batch_size: int
    main: Callable[[], dict[str, Tensor]]
    pretrain: dict[str, tuple[int, Callable[[], dict[str, Tensor]]]] = field(default_factory=dict)


def build_trainee(method_name: str, teacher_arch: str | None, student_arch: str,
                  batch_size: int, precision: str = PRECISION) -> Trainee:
    method_class = registered_method(method_name)
    torch.manual_seed(0)
    batch = random_batch(batch_size)
    method = method_class(method_class.Config())
    student = network(student_arch)
    teacher = None
    if method.uses_teacher and teacher_arch is not None:
        teacher = network(teacher_arch).eval().requires_grad_(False)
    student_taps = FeatureTaps(student, method.student_taps)
    teacher_taps = FeatureTaps(teacher, method.teacher_taps) if teacher is not None else None
    sample = batch.images[:2]
    with torch.no_grad():
        student.eval()
        student_shapes = shapes_of(student_taps.pop(student(sample)), student)
        teacher_shapes = shapes_of(teacher_taps.pop(teacher(sample)), teacher) if teacher is not None else None
    method.build(student_shapes, teacher_shapes, NUM_TRAIN)
    method.to(DEVICE)
    # A balanced training set (the batch's own labels are random; only the sampling's cost counts).
    method.observe_training_set(torch.arange(NUM_TRAIN, device=DEVICE) % NUM_CLASSES)
    stages = method.pretrain_stages()
    progress = Progress(epoch=0, epochs=RECIPE.epochs, step=0,
                        steps_per_epoch=math.ceil(NUM_TRAIN / batch_size),
                        pretrain_epochs=sum(stage.epochs for stage in stages))
    student_parameters = list(student.parameters())
    optimizer = build_optimizer(student_parameters + iter_parameters(method.trainable_modules()), RECIPE)
    run_student, run_teacher = as_run(student, precision), as_run(teacher, precision)
    trainee = Trainee(method, batch_size, main_step(
        method, run_student, run_teacher, student_taps, teacher_taps, student_parameters,
        optimizer, batch, progress))
    for stage in stages:
        stage_parameters = (parameters_feeding(student, student_taps, stage.student_up_to_stage, sample,
                                               stage.student_role)
                            if stage.student_up_to_stage is not None else [])
        stage_recipe = (RECIPE if stage.weight_decay is None
                        else RECIPE.with_overrides({"weight_decay": stage.weight_decay}))
        stage_optimizer = build_optimizer(stage_parameters + iter_parameters(stage.modules), stage_recipe)
        trainee.pretrain[stage.name] = (stage.epochs, pretrain_step(
            stage, run_student, run_teacher, student_taps, teacher_taps, stage_optimizer, batch))
    return trainee


def eval_step(arch: str, batch_size: int, precision: str = PRECISION) -> Callable[[], Tensor]:
    """One test batch as train.evaluate takes it: eval mode, no_grad, autocast, top-5."""
    model = as_run(network(arch), precision)
    images = random_batch(batch_size).images

    @torch.no_grad()
    def step() -> Tensor:
        model.eval()
        return model(images).topk(5, dim=1).indices

    return step


# --- timing -----------------------------------------------------------------------------------

def synchronize() -> None:
    if ON_CUDA:
        torch.cuda.synchronize(DEVICE)


class GpuUtilisation:
    """NVML's GPU utilisation — the percentage of each sample period (1/6 s to 1 s) in which a
    kernel ran, not how busy the SMs were — sampled every 20 ms in a thread while timing.
    pynvml (nvidia-ml-py) is imported only here, on CUDA; without it the figure is skipped."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.unavailable: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handle = None
        if not ON_CUDA:
            self.unavailable = "no CUDA device"
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = self._device_handle(pynvml)
        except Exception as error:  # missing package, no driver library, NVML error
            self.unavailable = f"{type(error).__name__}: {error}"

    @staticmethod
    def _device_handle(pynvml: Any) -> Any:
        # By PCI bus id: CUDA's device numbering (CUDA_VISIBLE_DEVICES) need not be NVML's.
        try:
            properties = torch.cuda.get_device_properties(DEVICE)
            bus_id = (f"{properties.pci_domain_id:08X}:{properties.pci_bus_id:02X}:"
                      f"{properties.pci_device_id:02X}.0")
            return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        except Exception:
            return pynvml.nvmlDeviceGetHandleByIndex(DEVICE.index or 0)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __enter__(self) -> "GpuUtilisation":
        if self._handle is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    def percent(self) -> float | None:
        # The first samples still cover the period before timing began: drop the first quarter.
        steady = self.samples[len(self.samples) // 4:]
        return round(statistics.mean(steady), 1) if steady else None


@dataclass
class Throughput:
    batch_size: int
    seconds_per_step: float
    # This process's CPU time per step. On a shared CPU it falls short of the wall time by what
    # the neighbours took; on CUDA it means little (synchronize spin-waits), so it is not shown.
    host_cpu_seconds_per_step: float
    steps_per_round: int
    rounds: int
    measured: bool  # False: one cold step (--benchmark-disable), not a measurement
    flops_per_step: float | None = None
    gpu_util_percent: float | None = None
    gpu_util_missing: str | None = None
    outputs: list[Any] = field(default_factory=list)  # every step's return value

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.seconds_per_step

    def details(self) -> dict[str, Any]:
        details: dict[str, Any] = {
            "images_per_s": round(self.images_per_second, 1),
            "ms_per_step": round(1000 * self.seconds_per_step, 3),
            "batch": self.batch_size, "device": device_name(), "precision": PRECISION,
            "channels_last": CHANNELS_LAST, "threads": torch.get_num_threads(),
            "steps_per_round": self.steps_per_round, "rounds": self.rounds,
        }
        if not ON_CUDA:
            details["cpu_time_ms_per_step"] = round(1000 * self.host_cpu_seconds_per_step, 3)
        if self.flops_per_step:
            tflops = self.flops_per_step / self.seconds_per_step / 1e12
            details["gflop_per_step"] = round(self.flops_per_step / 1e9, 2)
            details["achieved_tflops"] = round(tflops, 3)
            peak = next((peak for name, peak in BF16_PEAK_TFLOPS.items() if name in device_name()), None)
            if peak and PRECISION == "bf16":
                details["pct_of_bf16_peak"] = round(100 * tflops / peak, 2)
        if ON_CUDA:
            details["gpu_util_pct"] = self.gpu_util_percent
            if self.gpu_util_missing:
                details["gpu_util_missing"] = self.gpu_util_missing
        return details


def device_name() -> str:
    return torch.cuda.get_device_name(DEVICE) if ON_CUDA else "cpu"


def count_flops(step: Callable[[], Any]) -> tuple[float | None, Any]:
    """Run one step under torch's FLOP counter: (model FLOPs of the step, its result)."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None, step()
    with FlopCounterMode(display=False) as counter:
        result = step()
    return float(counter.get_total_flops()) or None, result


def measure(step: Callable[[], Any], batch_size: int, measured: bool,
            pedantic: Callable[..., Any] | None = None) -> Throughput:
    """Seconds per step of ``step``: warm-up (the first step under the FLOP counter), then
    ROUNDS rounds of as many steps as fill ROUND_SECONDS, each round closed by a device
    synchronisation, timed by hand and — when given — through pytest-benchmark's ``pedantic``.
    Not ``measured`` (--benchmark-disable): one cold step."""
    outputs: list[Any] = []
    if not measured:
        started, cpu_started = time.perf_counter(), time.process_time()
        run = lambda: (outputs.append(step()), synchronize())  # noqa: E731
        pedantic(run) if pedantic is not None else run()
        return Throughput(batch_size, time.perf_counter() - started,
                          time.process_time() - cpu_started, 1, 1, False, outputs=outputs)

    flops, result = count_flops(step)
    outputs.append(result)
    for _ in range(WARMUP_STEPS - 1):
        outputs.append(step())
    synchronize()
    steps_per_round = 1
    if ROUND_SECONDS:
        started = time.perf_counter()
        probe = 3
        for _ in range(probe):
            outputs.append(step())
        synchronize()
        per_step = (time.perf_counter() - started) / probe
        steps_per_round = max(1, min(MAX_STEPS_PER_ROUND, math.ceil(ROUND_SECONDS / per_step)))

    seconds: list[float] = []
    cpu_seconds: list[float] = []

    def timed_round() -> None:
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(steps_per_round):
            outputs.append(step())
        synchronize()
        cpu_seconds.append(time.process_time() - cpu_started)
        seconds.append(time.perf_counter() - started)

    utilisation = GpuUtilisation()
    with utilisation:
        if pedantic is not None:
            pedantic(timed_round, rounds=ROUNDS, warmup_rounds=0, iterations=1)
        else:
            for _ in range(ROUNDS):
                timed_round()
    return Throughput(batch_size, statistics.median(seconds) / steps_per_round,
                      statistics.median(cpu_seconds) / steps_per_round, steps_per_round,
                      len(seconds), True, flops, utilisation.percent(),
                      utilisation.unavailable if ON_CUDA else None, outputs)


def assert_finite(name: str, outputs: list[Any]) -> None:
    assert outputs, f"{name}: no step ran"
    for terms in outputs:
        for term_name, value in terms.items():
            assert value.dim() == 0 and math.isfinite(value.item()), f"{name}: {term_name} = {value}"


# Main-stage rates measured in this session, (teacher, student, batch, method) → Throughput,
# so the table reuses the per-method measurements instead of repeating them.
MEASURED: dict[tuple[str, str, int, str], Throughput] = {}


def main_throughput(teacher: str, student: str, batch_size: int, name: str, measured: bool,
                    pedantic: Callable[..., Any] | None = None) -> Throughput:
    key = (teacher, student, batch_size, name)
    if key not in MEASURED or pedantic is not None:
        trainee = build_trainee(name, teacher, student, batch_size)
        result = measure(trainee.main, batch_size, measured, pedantic)
        assert_finite(f"{name} ({teacher} -> {student}, batch {batch_size})", result.outputs)
        result.outputs = []  # the checks are done; release the graphs' outputs
        MEASURED[key] = result
    return MEASURED[key]


def skip_reason(pair: tuple[str, str], batch_size: int, measured: bool) -> str | None:
    if not measured:
        # The smoke run: one step per pair and method, once (at the first batch size).
        return None if batch_size == BATCHES[0] else "smoke run (--benchmark-disable): one batch size suffices"
    if ON_CUDA or (pair == DEFAULT_PAIR and batch_size == RECIPE.batch_size):
        return None
    return (f"CUDA-only case: on the CPU only {DEFAULT_PAIR[0]} -> {DEFAULT_PAIR[1]} at batch "
            f"{RECIPE.batch_size} is measured (a step is 0.5-5 s on one CPU core)")


@pytest.fixture(scope="module", autouse=True)
def cuda_fast_settings():
    """train.py's CUDA settings for this module's steps, restored afterwards."""
    if not ON_CUDA:
        yield
        return
    saved = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # as train.py: fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    yield
    (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32,
     torch.backends.cudnn.allow_tf32) = saved


# --- the benchmarks ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("batch_size", BATCHES, ids=lambda b: f"b{b}")
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0]}-{p[1]}")
def test_step_throughput(pair: tuple[str, str], batch_size: int, name: str, benchmark, report) -> None:
    reason = skip_reason(pair, batch_size, benchmark.enabled)
    if reason:
        pytest.skip(reason)
    teacher, student = pair
    size = batch_size if benchmark.enabled else SMOKE_BATCH
    result = main_throughput(teacher, student, size, name, benchmark.enabled, benchmark.pedantic)
    alone = main_throughput(teacher, student, size, STUDENT_ALONE, benchmark.enabled)
    report("step_time_vs_student", alone.images_per_second / result.images_per_second,
           pair=f"{teacher}->{student}", **result.details())


def test_table_time(benchmark, report) -> None:
    """The 5 methods × 5 seeds wrn_40_2 → wrn_16_2 table with the common recipe (240 epochs ×
    50 000 images, evaluation on 10 000 images every epoch), plus the Student row's 5 runs and
    the teacher, one run after another on this device: an extrapolation from the measured step
    rates, not a measurement of a run. Per run: main-stage images / the method's rate +
    pre-training epochs (FitNets' hints, MHGD's attention network; full length on CIFAR) × 50 000
    / the stage's rate + 240 × 10 000 test images / the network's evaluation rate. Not in it:
    the data pipeline, the loop's bookkeeping, checkpoints, process start-up."""
    measured = benchmark.enabled
    teacher_arch, student_arch = DEFAULT_PAIR
    batch_size = RECIPE.batch_size if measured else SMOKE_BATCH
    eval_batch = EVAL_BATCH_HERE if measured else SMOKE_BATCH
    methods = [name for name in METHODS if name != STUDENT_ALONE]
    skipped: list[str] = []
    eval_images = RECIPE.epochs // RECIPE.eval_every * NUM_TEST

    # The teacher's own run: wrn_40_2 trained alone (the Student-row step on the teacher's
    # architecture), through pytest-benchmark.
    # Teachers are trained in fp32 at every precision (kdbench.spec.RunSpec.teacher_spec).
    teacher_run = build_trainee(STUDENT_ALONE, None, teacher_arch, batch_size, precision="fp32")
    teacher_rate = measure(teacher_run.main, batch_size, measured, benchmark.pedantic)
    assert_finite("teacher", teacher_rate.outputs)
    del teacher_run
    teacher_eval = measure(eval_step(teacher_arch, eval_batch, precision="fp32"), eval_batch, measured)
    student_eval = measure(eval_step(student_arch, eval_batch), eval_batch, measured)
    teacher_seconds = (RECIPE.epochs * NUM_TRAIN / teacher_rate.images_per_second
                       + eval_images / teacher_eval.images_per_second)

    def run_seconds(name: str) -> float:
        main = main_throughput(teacher_arch, student_arch, batch_size, name, measured)
        seconds = (RECIPE.epochs * NUM_TRAIN / main.images_per_second
                   + eval_images / student_eval.images_per_second)
        trainee = build_trainee(name, teacher_arch, student_arch, batch_size)
        for stage_name, (epochs, step) in trainee.pretrain.items():
            stage = measure(step, batch_size, measured)
            assert_finite(f"{name} stage {stage_name}", stage.outputs)
            # DEFAULT's pretrain_scale is 1: the papers' full pre-training epochs.
            seconds += epochs * DEFAULT.pretrain_scale * NUM_TRAIN / stage.images_per_second
        return seconds

    per_run: dict[str, float] = {}
    for name in [STUDENT_ALONE, *methods]:
        try:
            per_run[name] = run_seconds(name)
        except pytest.skip.Exception as why:  # a method whose import fails
            skipped.append(f"{name} ({why})")
    counted = [name for name in methods if name in per_run]
    table_seconds = (TABLE_SEEDS * sum(per_run[name] for name in counted)
                     + TABLE_SEEDS * per_run[STUDENT_ALONE] + teacher_seconds)
    assert math.isfinite(table_seconds) and table_seconds > 0
    hours = table_seconds / 3600
    report("table_vs_teacher_run", table_seconds / teacher_seconds,
           table_hours=round(hours, 2), table_days=round(hours / 24, 2),
           methods=",".join(counted), seeds=TABLE_SEEDS, skipped=";".join(skipped) or None,
           teacher_run_h=round(teacher_seconds / 3600, 3),
           **{f"{name}_run_h": round(seconds / 3600, 3) for name, seconds in per_run.items()},
           teacher_train_images_per_s=round(teacher_rate.images_per_second, 1),
           student_eval_images_per_s=round(student_eval.images_per_second, 1),
           teacher_eval_images_per_s=round(teacher_eval.images_per_second, 1),
           basis="extrapolated from step rates, runs one after another; data pipeline, "
                 "bookkeeping, checkpoints, start-up excluded",
           batch=batch_size, device=device_name(), precision=PRECISION,
           threads=torch.get_num_threads(), gpu_util_pct=teacher_rate.gpu_util_percent)
