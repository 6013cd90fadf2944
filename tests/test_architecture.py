"""The layering of docs/architecture.md, read from the source with `ast`, and the allowed values of the config
agreeing with the modules that implement them."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Library units from the bottom up: a unit may import itself and the units of LOWER rank, nothing else. utils/ is
# the leaf. Programs (tools/, bench/, paddle_pretrainedmodel/, tests/) may import any unit; no unit imports them.
RANKS = {
    "utils": 0,
    "config": 1, "losses": 1, "backbones": 1, "mxnet_reader": 1,
    "pfc": 2, "deploy": 2,
    "partial_fc": 3, "eval": 3,
    "synthetic": 4,
    "dataset": 5,
    "engine": 6,
    "train": 7,
}
PROGRAMS = ("tools", "bench", "paddle_pretrainedmodel", "tests")


def top_level_units() -> set[str]:
    return ({p.stem for p in ROOT.glob("*.py")}
            | {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()})


def unit_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path, units: set[str]) -> dict[str, int]:
    """Project units `path` imports (at the top or inside a function) -> the first line that does."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            head = name.split(".")[0]
            if head in units:
                found.setdefault(head, node.lineno)
    return found


def library_files() -> list[Path]:
    """The .py files of the top-level units (modules and packages), wherever the checkout's venvs and caches live."""
    units = top_level_units() - set(PROGRAMS)
    return sorted(p for p in ROOT.rglob("*.py") if unit_of(p) in units)


def test_every_library_module_has_a_layer() -> None:
    """A new top-level module or package gets a place in RANKS (and in docs/architecture.md) on purpose."""
    units = top_level_units() - set(PROGRAMS)
    assert units <= set(RANKS), f"not in a layer: {sorted(units - set(RANKS))}"


def test_library_modules_import_only_lower_layers() -> None:
    units = top_level_units()
    wrong = []
    for path in library_files():
        unit = unit_of(path)
        for other, line in imported_units(path, units).items():
            if other != unit and not (other in RANKS and RANKS[other] < RANKS.get(unit, -1)):
                wrong.append(f"{path.relative_to(ROOT)}:{line} ({unit}, layer {RANKS.get(unit)}) imports {other} "
                             f"(layer {RANKS.get(other, 'program')})")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """The walk finds imports inside functions too (the kind that hid utils/ -> eval/ before)."""
    module = tmp_path / "m.py"
    module.write_text("import os\n\ndef f():\n    from eval.bin_io import write_bin\n    import dataset.x\n")
    assert imported_units(module, {"eval", "dataset", "utils"}) == {"eval": 4, "dataset": 5}


def test_utils_is_a_leaf() -> None:
    units = top_level_units()
    upward = {str(p.relative_to(ROOT)): sorted(set(imported_units(p, units)) - {"utils"})
              for p in (ROOT / "utils").glob("*.py")}
    assert not {k: v for k, v in upward.items() if v}, upward


@pytest.mark.parametrize("key, module, name", [
    ("network", "backbones", "NETWORKS"),
    ("data_format", "backbones", "DATA_FORMATS"),
    ("loss", "losses", "LOSS_NAMES"),
    ("margin_grad", "losses", "GRAD_MODES"),
    ("optimizer", "pfc.spec", "OPTIMIZERS"),
    ("pfc_backend", "partial_fc", "BACKENDS"),
    ("pfc_kernel", "pfc.paddle_head", "KERNELS"),
])
def test_config_choices_are_what_the_modules_implement(key: str, module: str, name: str) -> None:
    """config.py stays light (no Paddle import) and so spells the choices out; they must equal the implementations'."""
    import importlib

    from config import CHOICES

    assert tuple(CHOICES[key]) == tuple(getattr(importlib.import_module(module), name)), (key, module, name)


# Programs whose import is checked too (their main() sets what they need).
QUIET_PROGRAMS = ("tools.gallery", "tools.inference", "tools.recognize", "tools.export", "tools.make_face_demo",
                  "tools.plot_metrics", "tools.selfcheck", "tools.check_dataset", "tools.images2rec",
                  "tools.rec2images", "tools.bin_tool", "paddle_pretrainedmodel.model_test",
                  "paddle_pretrainedmodel.convert_torch", "bench.loader", "bench.train", "bench.synth_difficulty",
                  "bench.train_modes")


def test_importing_any_library_module_or_tool_leaves_the_environment_alone() -> None:
    """Every library module (and the quiet programs) imported in one fresh process: os.environ is unchanged. Paddle,
    OpenCV, scikit-learn and torch are imported first: their own imports edit os.environ (OMP_NUM_THREADS, KMP_*)."""
    modules = sorted({".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                      for p in library_files() if p.name != "__main__.py"})
    code = ("import importlib, os, sys, cv2, paddle, sklearn, sklearn.model_selection, torch\n"
            "before = dict(os.environ)\n"
            "for name in sys.argv[1:]: importlib.import_module(name)\n"
            "print(sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)))")
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_DEBUG_CPU_TYPE", "GLOG_minloglevel")}
    proc = subprocess.run([sys.executable, "-c", code, *modules, *QUIET_PROGRAMS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr[-2000:]
