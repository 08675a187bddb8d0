"""The C the trainers share must compile, and its self-tests must pass: a
component whose code does not build would be noise in the knowledge base."""

from __future__ import annotations

import functools
import itertools
import random
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

from generated.kernelhub.v1 import hub_pb2 as pb
from trainer_service.simulation import codegen
from trainer_service.simulation.capabilities import (
    SPECIALIZATION_NAMES,
    Specialization,
    parse_specialization,
)

GCC = shutil.which("gcc")
needs_gcc = pytest.mark.skipif(GCC is None, reason="gcc is not installed")

SEEDS = (0, 1, 7, 42)
SPECS = SPECIALIZATION_NAMES
# The brief's command, unchanged: what every generated unit must pass.
SYNTAX_CMD = ("-std=c99", "-Wall", "-Werror", "-fsyntax-only", "-x", "c", "-")
# Stricter, for the units we also link and run.
STRICT = ("-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", "-O1")
# The command for a template file on its own.
TEMPLATE_CMD = ("-std=c99", "-Wall", "-Wextra", "-Werror", "-c", "-x", "c")
TEMPLATES = resources.files("trainer_service.simulation") / codegen.TEMPLATE_DIR
TEMPLATE_FILES = tuple(sorted(t.name for t in TEMPLATES.iterdir() if t.name.endswith((".c", ".h"))))


def _spec(name: str) -> Specialization:
    return parse_specialization(name)


def _syntax_check(code: str) -> subprocess.CompletedProcess[str]:
    assert GCC is not None
    return subprocess.run(
        [GCC, *SYNTAX_CMD], input=code, text=True, capture_output=True, timeout=60, check=False
    )


@functools.cache
def _sanitizer_flags() -> tuple[str, ...]:
    """ASan/UBSan catch out-of-bounds and overflow the self-tests would miss,
    but not every gcc install ships their runtimes."""
    assert GCC is not None
    flags = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all")
    probe = subprocess.run(
        [GCC, *flags, "-x", "c", "-", "-o", "/dev/null"],
        input="int main(void) { return 0; }\n",
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )
    return flags if probe.returncode == 0 else ()


def _compile_and_run(unit: codegen.GeneratedCode, workdir: Path) -> None:
    assert GCC is not None
    exe = workdir / "unit"
    source = unit.code + f"\nint main(void) {{ return {unit.entry_point}(); }}\n"
    built = subprocess.run(
        [GCC, *STRICT, *_sanitizer_flags(), "-x", "c", "-", "-o", str(exe)],
        input=source,
        text=True,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert built.returncode == 0, f"{unit.name} does not build:\n{built.stderr}"
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=False)
    assert ran.returncode == 0, (
        f"{unit.name} self-test {unit.entry_point}() failed with {ran.returncode}:\n{ran.stderr}"
    )


def _assert_well_formed(unit: codegen.GeneratedCode) -> None:
    assert unit.code.startswith("/* ")
    assert "#include <" in unit.code
    assert re.search(r"\bint\s+main\s*\(", unit.code) is None, "units must not define main()"
    assert f"int {unit.entry_point}(void)" in unit.code
    assert unit.test_cases and all(t.startswith("test_") for t in unit.test_cases)
    assert len(set(unit.test_cases)) == len(unit.test_cases)
    assert unit.dependencies
    assert re.search(r"\b(?:prefix|PREFIX)_", unit.code) is None, "a template prefix was left"
    assert "template body" not in unit.code and "#if " not in unit.code


# --- every specialization, every feature, a few seeds: syntax with the brief's flags


@needs_gcc
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("spec", SPECS)
def test_module_compiles(spec: str, seed: int) -> None:
    unit = codegen.generate_module(_spec(spec), random.Random(seed))
    _assert_well_formed(unit)
    assert unit.name == f"{spec}_module"
    result = _syntax_check(unit.code)
    assert result.returncode == 0, result.stderr


@needs_gcc
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("feature", codegen.FEATURES)
def test_feature_compiles(feature: str, seed: int) -> None:
    unit = codegen.generate_feature(feature, random.Random(seed))
    _assert_well_formed(unit)
    assert unit.name == feature
    result = _syntax_check(unit.code)
    assert result.returncode == 0, result.stderr


@needs_gcc
@pytest.mark.parametrize(("lead", "partner"), list(itertools.product(SPECS, SPECS)))
def test_collaborative_compiles_for_every_pair(lead: str, partner: str) -> None:
    unit = codegen.generate_collaborative(_spec(lead), _spec(partner), random.Random(3))
    _assert_well_formed(unit)
    assert unit.dependencies == (f"{lead}_module", f"{partner}_module")
    result = _syntax_check(unit.code)
    assert result.returncode == 0, result.stderr


# --- build for real and run the self-tests: the code does what it says


@needs_gcc
@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("spec", SPECS)
def test_module_selftest_passes(spec: str, seed: int, tmp_path: Path) -> None:
    _compile_and_run(codegen.generate_module(_spec(spec), random.Random(seed)), tmp_path)


@needs_gcc
@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("feature", codegen.FEATURES)
def test_feature_selftest_passes(feature: str, seed: int, tmp_path: Path) -> None:
    _compile_and_run(codegen.generate_feature(feature, random.Random(seed)), tmp_path)


@needs_gcc
@pytest.mark.parametrize(
    ("lead", "partner"),
    [("networking", "security"), ("graphics", "window_manager"), ("audio", "audio")],
)
def test_collaborative_selftest_passes(lead: str, partner: str, tmp_path: Path) -> None:
    unit = codegen.generate_collaborative(_spec(lead), _spec(partner), random.Random(11))
    _compile_and_run(unit, tmp_path)


@needs_gcc
def test_compiler_rejects_broken_code() -> None:
    """Guards the harness itself: a check that passes everything proves nothing."""
    result = _syntax_check("int f(void) { int unused; return 0; }\n")
    assert result.returncode != 0
    assert "unused" in result.stderr


# --- the templates themselves: C files that compile as they stand


def test_every_template_file_is_in_the_registry() -> None:
    """A template nothing renders is dead C; a registry entry without its file
    would only fail when the rng first picks it."""
    assert TEMPLATE_FILES, f"no templates found in {TEMPLATES}"
    components = (*codegen._MODULES.values(), *codegen._FEATURES.values())
    used = {c.template for c in components} | {"integration_glue"}
    assert {Path(name).stem for name in TEMPLATE_FILES} == used


@needs_gcc
@pytest.mark.parametrize("template", TEMPLATE_FILES)
def test_template_compiles_as_c(template: str, tmp_path: Path) -> None:
    """Each file on its own: with its defaults, then with every combination of
    its flags, so both sides of each #if are checked."""
    assert GCC is not None
    ref = TEMPLATES / template
    flags = sorted(set(re.findall(r"^#if (\w+)$", ref.read_text(encoding="utf-8"), re.M)))
    choices = [
        (),
        *(
            [f"-D{f}={v}" for f, v in zip(flags, bits, strict=True)]
            for bits in itertools.product("01", repeat=len(flags))
        ),
    ]
    with resources.as_file(ref) as path:
        for defines in choices:
            built = subprocess.run(
                [GCC, *TEMPLATE_CMD, *defines, str(path), "-o", str(tmp_path / "template.o")],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert built.returncode == 0, f"{template} {' '.join(defines)}:\n{built.stderr}"


def test_renderer_refuses_parameters_that_do_not_match_the_template() -> None:
    with pytest.raises(ValueError, match="MAX_INPUTS"):
        codegen._render("pcm_mixer", "pcm", {})
    with pytest.raises(ValueError, match="WITH_REMOVE is not on a flag"):
        codegen._render("run_queue", "runq", {"SLOTS": "8u", "QUANTUM": "2u", "WITH_REMOVE": 1})


# --- determinism and variety (no compiler needed)


@pytest.mark.parametrize("spec", SPECS)
def test_same_seed_same_code(spec: str) -> None:
    first = codegen.generate_module(_spec(spec), random.Random(5))
    second = codegen.generate_module(_spec(spec), random.Random(5))
    assert first == second


@pytest.mark.parametrize("spec", SPECS)
def test_seeds_vary_the_code(spec: str) -> None:
    variants = {codegen.generate_module(_spec(spec), random.Random(s)).code for s in range(8)}
    assert len(variants) > 1


@pytest.mark.parametrize("feature", codegen.FEATURES)
def test_feature_deterministic_and_varied(feature: str) -> None:
    assert (
        codegen.generate_feature(feature, random.Random(9)).code
        == codegen.generate_feature(feature, random.Random(9)).code
    )
    variants = {codegen.generate_feature(feature, random.Random(s)).code for s in range(8)}
    assert len(variants) > 1


def test_collaborative_pieces_do_not_clash() -> None:
    unit = codegen.generate_collaborative(
        _spec("networking"), _spec("networking"), random.Random(1)
    )
    assert "_lead_" in unit.code and "_peer_" in unit.code
    assert unit.entry_point == "collab_networking_networking_selftest"


def test_every_feature_of_the_contract_has_a_template() -> None:
    """The vocabulary lives in the contract's `Feature` enum; the trainer can build all of it."""
    contract = {
        name.removeprefix("FEATURE_").lower()
        for name in pb.Feature.DESCRIPTOR.values_by_name
        if name != "FEATURE_UNSPECIFIED"
    }
    assert set(codegen.FEATURES) == contract


def test_unknown_feature_and_specialization_are_refused() -> None:
    assert not codegen.is_known_feature("quantum_scheduler")
    with pytest.raises(ValueError, match="quantum_scheduler"):
        codegen.generate_feature("quantum_scheduler", random.Random(0))
    with pytest.raises(ValueError, match="unspecified"):
        codegen.generate_module(Specialization(0), random.Random(0))
