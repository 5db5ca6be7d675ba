"""The GPU suite of benchmarks/gpu/: shell syntax, the commands it runs, a tiny CPU run, the report, the wheel tools."""

import argparse
import importlib
import json
import os
import subprocess
import sys
import zipfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, "benchmarks")
GPU = os.path.join(BENCHMARKS, "gpu")
RUN_SUITE = os.path.join(GPU, "run_suite.sh")
STEPS = ["train_dit_xl", "train_dit_xl_compile", "train_others", "train_repa", "caching", "sampling"]


def _load(name, folder=GPU):
    """Import a script by file name (benchmarks/ and benchmarks/gpu/ are folders of scripts, not packages)."""
    for path in (BENCHMARKS, folder):
        if path not in sys.path:
            sys.path.insert(0, path)
    return importlib.import_module(name)


def test_shell_scripts_are_valid_bash():
    for script in ("run_suite.sh", "fetch_wheels.sh"):
        result = subprocess.run(["bash", "-n", os.path.join(GPU, script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


# ---- the commands of the suite ---------------------------------------------------------------------------------------


class _Parsed(Exception):
    """Raised in place of running a benchmark once its own parser has accepted the arguments."""


def _parse_with_own_parser(module, argv, monkeypatch):
    """The namespace that ``module.main(argv)`` parses with its own argparse parser; stops before any work."""
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(_Parsed) as parsed:
            module.main(argv)
    return parsed.value.args[0]


def _dry_run(*args):
    result = subprocess.run(
        ["bash", RUN_SUITE, "--dry-run", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHON": "python3"},
    )
    assert result.returncode == 0, result.stderr
    steps = []
    for line in result.stdout.splitlines():
        if line.startswith("STEP "):
            head, command = line.split(": ", 1)
            python, script, *argv = command.split()
            assert python == "python3"
            steps.append((head.split()[1], script, argv))
    return steps


@pytest.mark.parametrize("mode", [[], ["--tiny"]], ids=["gpu", "tiny"])
def test_dry_run_names_existing_scripts_with_flags_they_accept(mode, monkeypatch):
    steps = _dry_run(*mode)
    assert [name for name, _, _ in steps] == STEPS
    flops = _load("flops", BENCHMARKS)
    for name, script, argv in steps:
        assert os.path.isfile(os.path.join(REPO, script)), f"{name}: {script} does not exist"
        module = _load(os.path.splitext(os.path.basename(script))[0], os.path.dirname(os.path.join(REPO, script)))
        args = _parse_with_own_parser(module, argv, monkeypatch)
        assert args.tiny == bool(mode)
        assert args.output_dir.endswith(f"/{name}")  # each benchmark writes its JSON into the step's own folder
        if script.endswith("bench_train_throughput.py"):
            flops.get_models(args.models)  # the model names are checked after parsing
            assert (args.device == "cuda") != bool(mode)  # a GPU run must not fall back to CPU
        if script.endswith("bench_cache_latents.py"):
            assert args.vae == "random-sd"  # the machine cannot download the SD VAE

    # The headline number first: DiT-XL/2, eager, package vs plain.
    name, _, argv = steps[0]
    assert name == "train_dit_xl" and argv[argv.index("--models") + 1 :][:1] == ["dit-xl-2"]
    assert "--compile" in steps[1][2]
    # REPA's row: SiT-XL/2 with and without it, in one run.
    repa = dict((name, argv) for name, _, argv in steps)["train_repa"]
    assert "--repa" in repa and repa[repa.index("--models") + 1 :][:1] == ["sit-xl-2"]


def test_dry_run_rejects_unknown_steps_and_arguments():
    for args in (["--only", "nope"], ["--bogus"]):
        result = subprocess.run(["bash", RUN_SUITE, "--dry-run", *args], capture_output=True, text=True)
        assert result.returncode == 2 and args[-1] in result.stderr


# ---- a tiny run on CPU -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
    """The suite in its CPU smoke mode with three steps; `import datasets` is made to fail, so caching is skipped."""
    root = tmp_path_factory.mktemp("suite")
    shadow = root / "shadow" / "datasets"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('datasets hidden by the test')\n")
    (root / "wheels").mkdir()
    env = {
        **os.environ,
        "OUT": str(root / "out"),
        "SCRATCH": str(root / "scratch"),
        "WHEEL_DIR": str(root / "wheels"),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(root / "shadow"),
        "OMP_NUM_THREADS": "1",
    }
    result = subprocess.run(
        ["bash", RUN_SUITE, "--tiny", "--only", "train_dit_xl,train_repa,caching"],
        capture_output=True,
        text=True,
        env=env,
    )
    return result, root / "out"


def test_tiny_suite_writes_results_and_reports_the_skipped_step(tiny_suite):
    result, out = tiny_suite
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]  # a step did not finish
    assert "import datasets: FAILED: ImportError: datasets hidden by the test" in result.stdout
    assert "=== caching: SKIPPED" in result.stdout
    assert "1 of 3 steps did not finish: caching:SKIPPED" in result.stdout

    # At most 8, no folders.
    assert sorted(os.listdir(out)) == ["suite.log", "summary.json", "train_dit_xl.json", "train_repa.json"]
    assert "=== caching: SKIPPED" in (out / "suite.log").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert [(s["step"], s["status"], s["result"]) for s in summary["steps"]] == [
        ("train_dit_xl", "ok", "train_dit_xl.json"),
        ("train_repa", "ok", "train_repa.json"),
        ("caching", "SKIPPED", None),
    ]
    assert summary["steps"][0]["exit_code"] == 0 and summary["tiny"] is True
    assert summary["environment"]["ready"] == {"speed": True, "caching": False}
    train = json.loads((out / "train_dit_xl.json").read_text())
    assert [(r["model"], r["loop"]) for r in train["results"]] == [("dit-xl-2", "package"), ("dit-xl-2", "plain")]
    repa = json.loads((out / "train_repa.json").read_text())
    assert [(r["model"], r["loop"], r["error"]) for r in repa["results"]] == [
        (model, loop, None) for model in ("sit-xl-2", "sit-xl-2+repa") for loop in ("package", "plain")
    ]


# ---- report.py -------------------------------------------------------------------------------------------------------


def _doc_lines():
    with open(os.path.join(REPO, "docs", "benchmarks.md")) as f:
        return f.read().splitlines()


def test_report_prints_the_docs_tables_from_real_tiny_runs(tiny_suite, tmp_path, capsys):
    _, out = tiny_suite
    _load("bench_sampling", BENCHMARKS).main(
        [
            "--tiny",
            "--batch_size",
            "1",
            "--cases",
            "ddim:2:1.5",
            "dpm_solver:3:4.0",
            "--output_dir",
            str(tmp_path / "sampling"),
        ]
    )
    _load("bench_cache_latents", BENCHMARKS).main(["--tiny", "--output_dir", str(tmp_path / "caching")])
    capsys.readouterr()
    report = _load("report")
    text = report.main(
        [str(out), str(tmp_path / "sampling" / "sampling.json"), str(tmp_path / "caching" / "caching.json")]
    )
    lines = text.splitlines()

    # The column layouts are those of docs/benchmarks.md's GPU sections.
    doc = _doc_lines()
    for header in (report.TRAIN_HEADER, report.SAMPLING_HEADER):
        assert header[0] in doc and header[0] in lines and header[1] in lines

    # Machine, date and commands.
    summary = json.loads((out / "summary.json").read_text())
    assert lines[0].startswith("Machine: ") and summary["environment"]["date"] in lines[0]
    assert "`bash benchmarks/gpu/run_suite.sh --tiny --only train_dit_xl,train_repa,caching 540`" in text
    assert "- caching: SKIPPED" in text  # the skipped step is listed, not silently absent
    assert "python benchmarks/bench_train_throughput.py --tiny --models dit-xl-2" in lines  # no scratch paths

    # Training rows from the JSON values; the ratio is computed here.
    train = {r["loop"]: r for r in json.loads((out / "train_dit_xl.json").read_text())["results"]}
    package, plain = train["package"], train["plain"]
    ratio = package["images_per_second"] / plain["images_per_second"]
    assert (
        f"| dit-xl-2 | 4 | package | {package['images_per_second']:.1f} | {1e3 * package['step_seconds']:.1f} "
        f"| — | — | {ratio:.2f}× |"
    ) in lines
    assert (
        f"| dit-xl-2 | 4 | plain | {plain['images_per_second']:.1f} | {1e3 * plain['step_seconds']:.1f} | — | — |  |"
        in lines
    )

    # REPA's rows join the eager table after the DiTs, and its overhead is computed here from the step times.
    repa = {(r["model"], r["loop"]): r for r in json.loads((out / "train_repa.json").read_text())["results"]}
    table = [line.split(" | ")[:3] for line in lines if line.startswith("| ")]
    assert table.index(["| dit-xl-2", "4", "plain"]) < table.index(["| sit-xl-2", "4", "package"])
    assert table.index(["| sit-xl-2", "4", "plain"]) + 1 == table.index(["| sit-xl-2+repa", "4", "package"])
    with_repa, without = repa[("sit-xl-2+repa", "plain")], repa[("sit-xl-2", "plain")]
    assert with_repa["train_gflops_per_image"] > without["train_gflops_per_image"]  # the encoder and projector count
    overhead = [line for line in lines if line.startswith("REPA on SiT-XL/2")]
    assert len(overhead) == 1
    assert f"{with_repa['step_seconds'] / without['step_seconds'] - 1:+.1%} in the plain loop" in overhead[0]
    flops_ratio = with_repa["train_gflops_per_image"] / without["train_gflops_per_image"] - 1
    assert f"model FLOPs {flops_ratio:+.1%}" in overhead[0]

    # Sampling: guided DDIM / DPM-Solver evaluate 2 rows per step in both pipelines; EDM Heun with 32 steps evaluates
    # 2 × 32 − 1 = 63 times, 12 of them inside σ ∈ (0.19, 1.61] (see test_benchmarks.py).
    rows = {line.split(" | ")[0][2:]: line for line in lines if line.startswith("| ")}
    assert rows["DDIM 2, w = 1.5"].startswith("| DDIM 2, w = 1.5 | ClassConditionalPipeline / DiTPipeline | 4 / 4 | ")
    assert rows["DPM-Solver++ 3, w = 4"].split(" | ")[2] == "6 / 6"
    assert rows["EDM2-XS Heun 32, w = 2, full CFG"].split(" | ")[2] == "126"
    assert rows["EDM2-XS Heun 32, w = 2, σ ∈ (0.19, 1.61]"].split(" | ")[2] == "75"
    assert rows["EDM2-XS Heun 32, no CFG"].split(" | ")[2] == "63"
    assert "Limited-interval guidance: 40% fewer network evaluations (126 → 75 per image)" in text

    # Caching rows from the benchmark's own JSON.
    caching = json.loads((tmp_path / "caching" / "caching.json").read_text())
    assert caching["error"] is None and caching["end_to_end_images"] == 48
    assert f"| JPEG decode + ADM centre crop | {caching['decode_images_per_second']:,.1f} |" in text
    assert f"| `cache_latents` end to end | {caching['end_to_end_images_per_second']:,.1f} |" in text


def test_report_names_a_file_it_does_not_know(tmp_path, capsys):
    stray = tmp_path / "stray.json"
    stray.write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit):
        _load("report").main([str(stray)])
    assert "stray.json is not a result of benchmarks/gpu/run_suite.sh" in capsys.readouterr().err


# ---- wheel tools -----------------------------------------------------------------------------------------------------


def _wheel(path, name, version, files=(), requires=()):
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires
    )
    info = f"{name}-{version}.dist-info"
    members = {**{f: b"x" * 100 for f in files}, f"{info}/METADATA": metadata.encode()}
    record = "".join(f"{f},sha256=abc,{len(data)}\n" for f, data in members.items()) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
        archive.writestr(f"{info}/RECORD", record)
    return str(path)


def test_slim_wheel_drops_unused_parts_and_their_record_lines(tmp_path):
    slim = _load("slim_wheel")
    kept = ["pyarrow/__init__.py", "pyarrow/libarrow.so.2600", "pyarrow/libarrow_python.so.2600"]
    dropped = [
        "pyarrow/libarrow_flight.so.2600",
        "pyarrow/_flight.cpython-312-x86_64-linux-gnu.so",
        "pyarrow/libarrow_python.so",
        "pyarrow/libarrow_python.so.2600.1.0",
        "pyarrow/include/arrow/api.h",
        "pyarrow/tests/test_array.py",
        "pyarrow/lib.pyx",
    ]
    path = _wheel(
        tmp_path / "pyarrow-26.0.1-cp312-cp312-manylinux_2_28_x86_64.whl", "pyarrow", "26.0.1", kept + dropped
    )
    assert slim.distribution_of(path) == "pyarrow"
    slim.main([path])
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        record = archive.read("pyarrow-26.0.1.dist-info/RECORD").decode()
    info = {"pyarrow-26.0.1.dist-info/METADATA", "pyarrow-26.0.1.dist-info/RECORD"}
    assert names == set(kept) | info
    assert {line.split(",")[0] for line in record.splitlines()} == set(kept) | info


def test_install_plan_keeps_the_machines_copy_only_when_it_meets_the_requirements(tmp_path):
    install = _load("install_wheels")
    from packaging.version import Version

    user = install.read_wheel(
        _wheel(
            tmp_path / "user-1.0-py3-none-any.whl",
            "user",
            "1.0",
            requires=["lib>=2.0", "helper<1.5", 'extra-only; extra == "test"', 'always; python_version >= "3"'],
        )
    )
    assert [str(r) for r in user.requires] == ["lib>=2.0", "helper<1.5", 'always; python_version >= "3"']
    lib = install.read_wheel(_wheel(tmp_path / "lib-2.5-py3-none-any.whl", "lib", "2.5"))
    helper = install.read_wheel(_wheel(tmp_path / "Helper_Pkg-1.0-py3-none-any.whl", "Helper_Pkg", "1.0"))
    assert helper.name == "helper-pkg"

    machine = {"user": None, "lib": Version("1.9"), "helper-pkg": Version("3.0")}
    decisions = {
        wheel.name: (install_, reason) for wheel, install_, reason in install.plan([user, lib, helper], machine)
    }
    assert decisions["user"] == (True, "not on the machine")
    assert decisions["lib"][0] is True and "user needs lib>=2.0" in decisions["lib"][1]  # 1.9 is too old
    assert decisions["helper-pkg"][0] is False  # nothing constrains helper-pkg ("helper" is another name)


def test_extract_wheel_installs_without_pip(tmp_path):
    install = _load("install_wheels")
    path = _wheel(
        tmp_path / "demo-1.0-py3-none-any.whl",
        "demo",
        "1.0",
        ["demo/__init__.py", "demo-1.0.data/purelib/demo_extra.py", "demo-1.0.data/scripts/demo-cli"],
    )
    target = tmp_path / "site-packages"
    install.extract_wheel(path, str(target))
    assert (target / "demo" / "__init__.py").read_bytes() == b"x" * 100
    assert (target / "demo_extra.py").exists() and not (target / "demo-cli").exists()
    assert not (target / "demo-1.0.data").exists()
    assert "Version: 1.0" in (target / "demo-1.0.dist-info" / "METADATA").read_text()
