"""The package's shape: no import cycle, no upward import between folders, no oversized source file
(tests/check_layout.py), and the checker itself catches each on a small made-up package."""
from __future__ import annotations

import check_layout


def _write(root, rel, text):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_lmserve_has_no_import_cycle():
    assert check_layout.import_cycles() == []


def test_no_source_file_over_the_limit():
    assert check_layout.oversized_files() == []


def test_checker_finds_a_lazy_import_cycle_and_ignores_type_checking(tmp_path):
    _write(tmp_path, "lmserve/__init__.py", "")
    _write(tmp_path, "lmserve/a.py", "from lmserve.b import thing\n")
    _write(tmp_path, "lmserve/b.py", "def thing():\n    from lmserve import a\n    return a\n")
    _write(tmp_path, "lmserve/c.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lmserve.a import x\n")
    cycles = check_layout.import_cycles(str(tmp_path))
    assert len(cycles) == 1 and set(cycles[0]) == {"lmserve.a", "lmserve.b"}
    _write(tmp_path, "lmserve/csrc/big.cpp", "x\n" * 401)
    assert check_layout.oversized_files(str(tmp_path)) == [("lmserve/csrc/big.cpp", 401)]


def test_lmserve_has_no_upward_import():
    assert check_layout.upward_imports() == []


def test_checker_finds_a_lazy_upward_import(tmp_path):
    _write(tmp_path, "lmserve/__init__.py", "")
    _write(tmp_path, "lmserve/ops/__init__.py", "")
    _write(tmp_path, "lmserve/model/__init__.py", "")
    _write(tmp_path, "lmserve/model/layers.py", "from lmserve.ops import x\n")
    _write(tmp_path, "lmserve/ops/gemm.py", "def f():\n    from lmserve.model import layers\n    return layers\n")
    assert check_layout.upward_imports(str(tmp_path)) == [("lmserve.ops.gemm", "lmserve.model.layers")]
