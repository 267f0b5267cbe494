r"""Train/eval step throughput, compile time, memory and FLOPs of the model families.

    python scripts/benchmark.py --families resnet,dla_l,dla_b --depths 20,56 \
        --batch-sizes 128 --out bench.json --markdown bench.md

Every configuration is compiled first; then each runs its steps back to back. On a busy,
shared machine `--interleave` runs them round-robin instead (one step of each in turn),
so that load slows all alike (on the 2-core VM of docs/performance.md, round 17, ResNet-20
stepped as fast either way; before the CPU kernels, interleaving slowed it by ~30%).
Data is synthetic (random images, labels), the step is the training code's own
`train_step` (SGD with momentum, weight decay). Compile time is the wall time of
`lower(...).compile()`. Each model's stages are scanned or unrolled as its layout's recipe
builds them (`recipe_scans`: configs/cifar10.py scans beyond depth 56, configs/imagenet.py
always), unless `--scan` or `--no-scan` says otherwise. FLOPs are XLA's count on the
unrolled step lowered for XLA's own ops (`xla_gflops_per_image`), the same either way. Use
`--compile-only` to measure compile-time scaling (e.g. `--depths 20,164 --no-scan`).
`--profile DIR` then traces a few more steps of each configuration with `jax.profiler`
(TensorBoard/XProf/Perfetto read DIR/<configuration>/) and writes each compiled step's HLO
beside it, whose `op_name` metadata maps XLA's fusions back to the model's modules. More
than one device on a CPU needs `XLA_FLAGS=--xla_force_host_platform_device_count=N` set
beforehand.

`--official-code CLONE` also times the authors' PyTorch models (CIFAR layout, float32,
this CPU; a clone of https://github.com/tunantu/Dynamic-Layer-Attention, with torch and
einops installed) in the same run, each stepped as the official cifar.py steps it, beside ours.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dla_jax import cli, host_memory, models, parallel
from dla_jax.train import loop, optim
from dla_jax.train.state import create_train_state
from dla_jax.train.step import train_step

# Multiply-accumulates of one 224x224 forward pass (conv/linear/matmul), from the spec.
SPEC_MACS = {
    ("imagenet", 50, "resnet"): 4.089e9,
    ("imagenet", 50, "dla_l"): 4.209e9,
    ("imagenet", 101, "resnet"): 7.801e9,
    ("imagenet", 101, "dla_l"): 8.000e9,
}
IMAGE_SIZES = {"cifar": 32, "imagenet": 224}
# Where XLA's FLOPs are counted: any platform but the CPU lowers every op as XLA's own (`xla_gflops_per_image`).
FLOP_COUNT_PLATFORM = "cuda"
MODES = ("train", "eval")
# The official code's CIFAR model files, each defining a constructor of the file's name, per family.
OFFICIAL_MODELS = {"resnet": "resnet", "mrla_l": "mrla_light", "dla_l": "dla_l", "dla_b": "dla_b"}
OFFICIAL_MODELS_FOLDER = Path("image_classification/cifar/models/cifar")
OFFICIAL_REQUIREMENTS = ("torch", "einops")
RECIPES = {"cifar": "cifar10.py", "imagenet": "imagenet.py"}
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list: {err}") from None

    return parse


def _cost(lowered: Any) -> dict[str, float]:
    """XLA's cost analysis of a lowered step (a dict, or a one-element list of dicts on older jax)."""
    try:
        cost = lowered.cost_analysis()
    except Exception:  # not every backend implements it
        return {}
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def _memory(compiled: Any) -> dict[str, int]:
    """Buffer sizes the compiler planned (arguments, outputs, temporaries), where reported."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:
        return {}
    if analysis is None:
        return {}
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "generated_code_size_in_bytes")
    return {name: int(getattr(analysis, name)) for name in fields if hasattr(analysis, name)}


def _device_peak_bytes(devices: list[jax.Device]) -> int | None:
    """The allocator's peak over the devices (GPU/TPU); None where it keeps no statistics (CPU)."""
    peaks = []
    for device in devices:
        stats = device.memory_stats() if hasattr(device, "memory_stats") else None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def mesh_over(num_devices: int) -> jax.sharding.Mesh:
    """The training code's ("data", "fsdp") mesh over the first `num_devices` devices, all on "data"."""
    devices = np.array(jax.devices()[:num_devices]).reshape(num_devices, 1)
    auto = jax.sharding.AxisType.Auto  # as `parallel.create_mesh`
    return jax.sharding.Mesh(devices, parallel.MESH_AXES, axis_types=(auto, auto))


def recipe_scans(setting: dict[str, Any]) -> bool:
    """Whether the layout's recipe (`RECIPES`, in configs/) scans the stages of this family and depth."""
    recipe = cli.load_config(CONFIGS / RECIPES[setting["layout"]], f"{setting['family']},{setting['depth']}")
    return bool(recipe.model.scan_blocks)


def _steps(setting: dict[str, Any], mesh: jax.sharding.Mesh, *, scan: bool, remat: bool, seed: int) -> tuple:
    """The setting's model as the training code runs it: (state initialiser, state shardings, batch
    sharding, jitted steps by mode)."""
    model = models.create_model(
        setting["family"],
        layout=setting["layout"],
        depth=setting["depth"],
        num_classes=setting["num_classes"],
        dtype=jnp.dtype(setting["dtype"]),
        scan_blocks=scan,
        remat_attention=remat,
    )
    train_config = ml_collections.ConfigDict({"weight_decay": 1e-4, "momentum": 0.9})
    lr_schedule = lambda step: jnp.asarray(0.1, jnp.float32)  # noqa: E731  (constant: no schedule cost)
    tx = optim.create_optimizer(train_config, lr_schedule)
    size = setting["image_size"]
    init = functools.partial(create_train_state, model, tx, seed=seed, image_shape=(size, size, 3))
    state_shardings = parallel.state_shardings(mesh, jax.eval_shape(init))
    batch_sharding = parallel.batch_sharding(mesh)
    step_fns = {
        "train": jax.jit(
            functools.partial(train_step, model=model, tx=tx, lr_schedule=lr_schedule, label_smoothing=0.0),
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, parallel.replicated(mesh)),
            donate_argnums=0,
        ),
        "eval": loop.eval_function(model, mesh, state_shardings.variables()),
    }
    return init, state_shardings, batch_sharding, step_fns


def xla_gflops_per_image(
    setting: dict[str, Any], mesh: jax.sharding.Mesh, batch: dict[str, Any], modes: tuple[str, ...], *, remat: bool
) -> dict[str, float]:
    """XLA's count of each mode's FLOPs per image, on the unrolled model lowered for XLA's own ops.

    XLA's cost analysis counts the body of a `while` loop once (a scanned stage's blocks as
    one block) and a custom call as nothing (the CPU kernels), so the count is taken on the
    unrolled model, lowered for a platform other than the CPU, whatever the case runs: the
    same count for a scanned and an unrolled model, on any backend. Lowering compiles nothing.
    """
    init, _, _, step_fns = _steps(setting, mesh, scan=False, remat=remat, seed=0)
    state = jax.eval_shape(init)
    gflops = {}
    for mode in modes:
        weights = state if mode == "train" else state.variables()
        with jax.set_mesh(mesh):
            lowered = step_fns[mode].trace(weights, batch).lower(lowering_platforms=(FLOP_COUNT_PLATFORM,))
        cost = _cost(lowered)
        if "flops" in cost:
            gflops[mode] = cost["flops"] / setting["batch_size"] / 1e9
    return gflops


class Case:
    """One configuration: its jitted steps compiled, its state and synthetic batch placed."""

    def __init__(self, setting: dict[str, Any], *, scan: bool, remat: bool, modes: tuple[str, ...], seed: int = 0):
        self.setting = setting
        self.modes = modes
        layout, depth, batch = setting["layout"], setting["depth"], setting["batch_size"]
        num_devices = setting["devices"]
        if batch % num_devices:
            raise ValueError(f"batch size {batch} is not divisible by {num_devices} devices")
        mesh = mesh_over(num_devices)
        self.devices = list(mesh.devices.flat)
        init, state_shardings, batch_sharding, step_fns = _steps(setting, mesh, scan=scan, remat=remat, seed=seed)
        self.state = jax.jit(init, out_shardings=state_shardings)()
        rng = np.random.default_rng(seed)
        size = setting["image_size"]
        self.batch = jax.device_put(
            {
                "image": rng.standard_normal((batch, size, size, 3), np.float32),
                "label": rng.integers(0, setting["num_classes"], batch).astype(np.int32),
                "mask": np.ones(batch, bool),
            },
            batch_sharding,
        )
        self.compiled: dict[str, Any] = {}
        self.result: dict[str, Any] = dict(setting, implementation="dla_jax", scan=scan, remat_attention=remat)
        for mode in modes:
            start = time.perf_counter()
            weights = self.state if mode == "train" else self.state.variables()
            with jax.set_mesh(mesh):  # as in the training loop
                compiled = step_fns[mode].lower(weights, self.batch).compile()
            self.result[f"{mode}_compile_s"] = time.perf_counter() - start
            self.compiled[mode] = compiled
            self.result[f"{mode}_memory"] = _memory(compiled)
        for mode, gflops in xla_gflops_per_image(setting, mesh, self.batch, modes, remat=remat).items():
            self.result[f"{mode}_xla_gflops_per_image"] = gflops
        spec_macs = SPEC_MACS.get((layout, depth, setting["family"]))
        if spec_macs is not None and size == IMAGE_SIZES["imagenet"]:
            self.result["spec_gmacs_per_image"] = spec_macs / 1e9
        self.times: dict[str, list[float]] = {mode: [] for mode in modes}

    def run(self, mode: str) -> float:
        """One step, waited for; returns its wall time (the train step carries its state on)."""
        start = time.perf_counter()
        if mode == "train":
            self.state, metrics = self.compiled["train"](self.state, self.batch)
        else:
            metrics = self.compiled["eval"](self.state.variables(), self.batch)
        jax.block_until_ready(metrics)
        if mode == "train":
            jax.block_until_ready(self.state)
        return time.perf_counter() - start

    def name(self) -> str:
        """A file-name-safe label, e.g. dla_l-imagenet50-b128-bfloat16-d1-scan."""
        s = self.setting
        return (
            f"{s['family']}-{s['layout']}{s['depth']}-b{s['batch_size']}-{s['dtype']}-d{s['devices']}"
            f"-{'scan' if self.result['scan'] else 'unrolled'}{'-remat' if self.result['remat_attention'] else ''}"
        )

    def profile(self, directory: Path, steps: int) -> None:
        """Trace `steps` more steps of each mode into directory/<name>/, HLO text beside it."""
        directory.mkdir(parents=True, exist_ok=True)
        for mode in self.modes:
            (directory / f"{self.name()}-{mode}.hlo.txt").write_text(self.compiled[mode].as_text())
        with jax.profiler.trace(str(directory / self.name())):
            for _ in range(steps):
                for mode in self.modes:
                    self.run(mode)

    def summarise(self, warmup: int) -> dict[str, Any]:
        summarise_times(self.result, self.times, warmup)
        self.result["device_peak_bytes"] = _device_peak_bytes(self.devices)
        return self.result


def summarise_times(result: dict[str, Any], times: dict[str, list[float]], warmup: int) -> None:
    """Each mode's median step time and throughput, and its timed steps, into `result`."""
    for mode, steps in times.items():
        kept = steps[warmup:]
        if kept:
            median = statistics.median(kept)
            result[f"{mode}_step_s"] = median
            result[f"{mode}_images_per_s"] = result["batch_size"] / median
            result[f"{mode}_steps_timed"] = len(kept)
            result[f"{mode}_step_times_s"] = kept


def official_models_folder(path: Path) -> Path:
    """The official code's CIFAR model folder: inside the clone `path`, or `path` itself."""
    for folder in (path / OFFICIAL_MODELS_FOLDER, path):
        if (folder / "dla_l.py").is_file():
            return folder
    raise FileNotFoundError(
        f"{path} holds neither {OFFICIAL_MODELS_FOLDER}/dla_l.py nor dla_l.py: give a clone of "
        "https://github.com/tunantu/Dynamic-Layer-Attention"
    )


@contextlib.contextmanager
def _cuda_as_no_op(torch: Any):
    """The official code makes its DSU's zero state with `.cuda()`; here everything stays on the CPU."""
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


class OfficialCase:
    """The authors' PyTorch model for one CIFAR setting, on this CPU, stepped as their cifar.py
    steps it (cross-entropy, SGD with momentum 0.9; weight decay 1e-4 as in `Case`), on a
    synthetic batch of `Case`'s shape; its rows say implementation "official-pytorch"."""

    def __init__(self, setting: dict[str, Any], folder: Path, *, modes: tuple[str, ...], seed: int = 0):
        import torch  # optional: only for --official-code

        self.torch, self.setting, self.modes = torch, setting, modes
        name = OFFICIAL_MODELS[setting["family"]]
        spec = importlib.util.spec_from_file_location(f"official_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        torch.manual_seed(seed)
        self.model = getattr(module, name)(
            depth=setting["depth"], num_classes=setting["num_classes"], block_name="bottleneck"
        )
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        rng = np.random.default_rng(seed)
        batch, size = setting["batch_size"], setting["image_size"]
        self.images = torch.from_numpy(rng.standard_normal((batch, 3, size, size), np.float32))
        self.labels = torch.from_numpy(rng.integers(0, setting["num_classes"], batch))
        self.result: dict[str, Any] = dict(setting, implementation="official-pytorch", scan=None, remat_attention=None)
        self.times: dict[str, list[float]] = {mode: [] for mode in modes}

    def run(self, mode: str) -> float:
        """One step (train: forward, backward, SGD update; eval: forward without gradients); its wall time."""
        torch = self.torch
        start = time.perf_counter()
        with _cuda_as_no_op(torch):
            if mode == "train":
                self.model.train()
                self.optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(self.model(self.images), self.labels).backward()
                self.optimizer.step()
            else:
                self.model.eval()
                with torch.no_grad():
                    self.model(self.images)
        return time.perf_counter() - start

    def name(self) -> str:
        s = self.setting
        return f"official-{s['family']}-cifar{s['depth']}-b{s['batch_size']}-float32"

    def profile(self, directory: Path, steps: int) -> None:
        """Trace `steps` more steps of each mode with torch.profiler into directory/<name>.trace.json."""
        directory.mkdir(parents=True, exist_ok=True)
        with self.torch.profiler.profile() as trace:
            for _ in range(steps):
                for mode in self.modes:
                    self.run(mode)
        trace.export_chrome_trace(str(directory / f"{self.name()}.trace.json"))

    def summarise(self, warmup: int) -> dict[str, Any]:
        summarise_times(self.result, self.times, warmup)
        return self.result


def run_benchmark(
    settings: list[dict[str, Any]],
    *,
    scan: bool | None,
    remat: bool,
    modes: tuple[str, ...],
    steps: int,
    warmup: int,
    interleave: bool = False,
    profile: Path | None = None,
    profile_steps: int = 3,
    official_code: Path | None = None,
    log: Callable[[str], None] = lambda text: None,
) -> list[dict[str, Any]]:
    """Compiles every setting, then times `warmup + steps` steps of each (round-robin if
    `interleave`); with `profile`, traces `profile_steps` more of each afterwards. With
    `official_code` (a clone), each setting's official PyTorch model is timed after ours.
    `scan=None` scans the stages where the recipe does (`recipe_scans`)."""
    official_folder = None if official_code is None else official_models_folder(official_code)
    cases: list[Case | OfficialCase] = []
    for setting in settings:
        log(f"compiling {describe(setting)}")
        scanned = recipe_scans(setting) if scan is None else scan
        cases.append(Case(setting, scan=scanned, remat=remat, modes=modes))
        log("  " + ", ".join(f"{m} {cases[-1].result[f'{m}_compile_s']:.1f}s" for m in modes))
        if official_folder is not None:
            cases.append(OfficialCase(setting, official_folder, modes=modes))
    groups = [cases] * (warmup + steps) if interleave else [[case] * (warmup + steps) for case in cases]
    for index, group in enumerate(groups):
        for case in group:
            for mode in modes:
                case.times[mode].append(case.run(mode))
        log(f"timed {index + 1}/{len(groups)} " + ("rounds" if interleave else "configurations"))
    if profile is not None:
        for case in cases:
            log(f"profiling {describe(case.setting)} into {profile / case.name()}")
            case.profile(profile, profile_steps)
    return [case.summarise(warmup) for case in cases]


def describe(setting: dict[str, Any]) -> str:
    return (
        f"{setting['family']} {setting['layout']}-{setting['depth']} batch {setting['batch_size']} "
        f"{setting['dtype']} on {setting['devices']} device(s)"
    )


# What `add_ratios` compares, and the prefix of each ratio's name.
RATIOS = {"train_step_s": "train", "eval_step_s": "eval", "train_compile_s": "train_compile"}


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Step time relative to the same implementation's plain ResNet with the same layout, depth,
    batch, dtype and devices; and ours relative to the official PyTorch code's same model."""
    setting = lambda r: (r["layout"], r["depth"], r["batch_size"], r["dtype"], r["devices"])  # noqa: E731
    resnets = {(r["implementation"], setting(r)): r for r in results if r["family"] == "resnet"}
    officials = {(r["family"], setting(r)): r for r in results if r["implementation"] == "official-pytorch"}
    for result in results:
        baselines = {"resnet": resnets.get((result["implementation"], setting(result)))}
        if result["implementation"] == "dla_jax":
            baselines["official"] = officials.get((result["family"], setting(result)))
        for against, base in baselines.items():
            for measure, ratio in RATIOS.items():
                if base and measure in result and measure in base:
                    result[f"{ratio}_vs_{against}"] = result[measure] / base[measure]


def _format(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(results: list[dict[str, Any]]) -> str:
    """One row per configuration: throughput, step time relative to ResNet (and to the official
    code's same model), compile times, FLOPs, memory."""
    header = (
        "| implementation | family | layout | depth | batch | dtype | devices | scan | remat | train img/s "
        "| train x ResNet | train x official | eval img/s | train compile s | eval compile s "
        "| XLA GFLOP/img (train) | XLA GFLOP/img (eval) | spec GMAC/img | train temp MiB |"
    )
    yes_no = {True: "yes", False: "no", None: ""}
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in results:
        temp = r.get("train_memory", {}).get("temp_size_in_bytes")
        cells = [
            r["implementation"],
            r["family"],
            r["layout"],
            str(r["depth"]),
            str(r["batch_size"]),
            r["dtype"],
            str(r["devices"]),
            yes_no[r["scan"]],
            yes_no[r["remat_attention"]],
            _format(r.get("train_images_per_s"), 1),
            _format(r.get("train_vs_resnet"), 2),
            _format(r.get("train_vs_official"), 2),
            _format(r.get("eval_images_per_s"), 1),
            _format(r.get("train_compile_s"), 1),
            _format(r.get("eval_compile_s"), 1),
            _format(r.get("train_xla_gflops_per_image"), 3),
            _format(r.get("eval_xla_gflops_per_image"), 3),
            _format(r.get("spec_gmacs_per_image"), 3),
            _format(None if temp is None else temp / 2**20, 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# Environment variables that change step times (XLA and JAX flags, the C allocator's tuning).
PERFORMANCE_ENVIRONMENT = ("XLA_", "JAX_", "MALLOC_", "LD_PRELOAD", "OMP_", "TF_")


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_description() -> dict[str, Any]:
    """What the numbers depend on: the device (a GPU's name is its device_kind), the host CPU
    and cores this process may use, the versions, and the performance-relevant environment."""
    device = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "host_cpu": _cpu_model(),
        "host_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "jax_version": jax.__version__,
        "python_version": platform.python_version(),
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(PERFORMANCE_ENVIRONMENT)},
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", type=_csv(str), default=["resnet", "dla_l", "dla_b"])
    parser.add_argument("--layout", choices=sorted(models.LAYOUTS), default="cifar")
    parser.add_argument("--depths", type=_csv(int), default=[20])
    parser.add_argument("--batch-sizes", type=_csv(int), default=[128])
    parser.add_argument("--dtypes", type=_csv(str), default=["float32"], help="float32 and/or bfloat16")
    parser.add_argument("--devices", type=_csv(int), default=[1], help="device counts (a mesh over the first N)")
    parser.add_argument("--image-size", type=int, default=None, help="default: 32 (cifar) or 224 (imagenet)")
    parser.add_argument("--num-classes", type=int, default=None, help="default: 10 (cifar) or 1000 (imagenet)")
    parser.add_argument("--modes", type=_csv(str), default=list(MODES), help="train and/or eval")
    parser.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="nn.scan over blocks (default: as the recipe)",
    )
    parser.add_argument(
        "--remat-attention",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="recompute the light attention branch in the backward pass (the model's remat_attention)",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="tune glibc malloc as dla_jax.main does when JAX computes on the CPU (dla_jax.host_memory)",
    )
    parser.add_argument("--interleave", action="store_true", help="step the configurations round-robin")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--compile-only", action="store_true", help="compile and analyse, run no steps")
    parser.add_argument("--profile", type=Path, default=None, help="trace extra steps into this folder")
    parser.add_argument("--out", type=Path, default=Path("benchmark.json"))
    parser.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--official-code",
        type=Path,
        default=None,
        help="a clone of the authors' PyTorch code: time its models too (needs torch and einops)",
    )
    args = parser.parse_args(argv)
    for family in args.families:
        if family not in models.FAMILIES:
            parser.error(f"--families: {family!r} is unknown, use some of {','.join(models.FAMILIES)}")
    for depth in args.depths:
        try:
            models.validate_depth(args.layout, depth)
        except ValueError as err:
            parser.error(f"--depths: {err}")
    for dtype in args.dtypes:
        if dtype not in ("float32", "bfloat16"):
            parser.error(f"--dtypes: {dtype!r} is not float32 or bfloat16")
    for mode in args.modes:
        if mode not in MODES:
            parser.error(f"--modes: {mode!r} is not one of {','.join(MODES)}")
    # Before JAX starts its runtime (the device count below does), as in dla_jax.main.
    args.malloc_tuned = args.keep_freed_memory and host_memory.keep_freed_memory()
    available = jax.device_count()
    for count in args.devices:
        if not 1 <= count <= available:
            parser.error(
                f"--devices {count}: only {available} device(s); on a CPU set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before starting"
            )
        for batch in args.batch_sizes:
            if batch % count:
                parser.error(f"--batch-sizes {batch} is not divisible by --devices {count}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")
    if args.official_code is not None:
        _check_official_code(parser, args)
    return args


def _check_official_code(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """--official-code's clone, settings and requirements: its CIFAR models, 32x32, float32, one device."""
    try:
        folder = official_models_folder(args.official_code)
    except FileNotFoundError as err:
        parser.error(f"--official-code: {err}")
    missing_files = [
        f"{OFFICIAL_MODELS[f]}.py" for f in args.families if not (folder / f"{OFFICIAL_MODELS[f]}.py").is_file()
    ]
    if missing_files:
        parser.error(f"--official-code: {folder} has no {', '.join(missing_files)}")
    cifar = args.layout == "cifar" and args.image_size in (None, IMAGE_SIZES["cifar"])
    if not cifar or args.dtypes != ["float32"] or args.devices != [1] or args.compile_only:
        parser.error(
            "--official-code times the official CIFAR models (32x32) in float32 on one device: use "
            "--layout cifar --dtypes float32 --devices 1, without --compile-only"
        )
    missing = [name for name in OFFICIAL_REQUIREMENTS if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"--official-code needs {' and '.join(missing)}: pip install {' '.join(missing)}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = [
        {
            "family": family,
            "layout": args.layout,
            "depth": depth,
            "batch_size": batch,
            "dtype": dtype,
            "devices": devices,
            "image_size": args.image_size or IMAGE_SIZES[args.layout],
            "num_classes": args.num_classes or (10 if args.layout == "cifar" else 1000),
        }
        for devices in args.devices
        for dtype in args.dtypes
        for batch in args.batch_sizes
        for depth in args.depths
        for family in args.families
    ]
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    results = run_benchmark(
        settings,
        scan=args.scan,
        remat=args.remat_attention,
        modes=tuple(args.modes),
        steps=0 if args.compile_only else args.steps,
        warmup=0 if args.compile_only else args.warmup,
        interleave=args.interleave,
        profile=None if args.compile_only else args.profile,
        official_code=args.official_code,
        log=log,
    )
    add_ratios(results)
    table = markdown_table(results)
    machine = dict(machine_description(), malloc_tuned=args.malloc_tuned)
    if args.official_code is not None:
        import torch  # checked by parse_args

        machine.update(torch_version=torch.__version__, torch_threads=torch.get_num_threads())
    record = {"machine": machine, "command": " ".join(sys.argv), "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
