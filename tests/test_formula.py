"""The Homebrew formula: Ruby syntax and style, its structure, and that its resources suffice.

What only macOS can prove (the build, `brew test`, `brew services`) is listed in the README.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from engine import __version__
from tests.conftest import require_tool

ROOT = Path(__file__).resolve().parent.parent
FORMULA = ROOT / "Formula" / "mlxd.rb"

# Homebrew's own style choices (double quotes, `bin/"x"` paths, 118 columns, no metrics for
# formulae), applied with Debian's plain rubocop.
RUBOCOP_CONFIG = """\
AllCops:
  NewCops: disable
  SuggestExtensions: false
Style/StringLiterals:
  EnforcedStyle: double_quotes
Style/StringLiteralsInInterpolation:
  EnforcedStyle: double_quotes
Style/FrozenStringLiteralComment:
  Enabled: false
Naming/HeredocDelimiterNaming:
  Enabled: false
Layout/SpaceAroundOperators:
  Enabled: false
Layout/HashAlignment:
  EnforcedColonStyle: table
  EnforcedHashRocketStyle: table
Layout/LineLength:
  Max: 118
  AllowedPatterns: ['\\A\\s*url "']
Metrics:
  Enabled: false
"""

# Declared by mlx-vlm / mlx-whisper but never imported by mlxd: must not be resources.
NOT_RESOURCES = {
    "torch", "datasets", "pyarrow", "pandas", "opencv-python", "fastapi", "uvicorn",
    "mlx-audio", "cryptography", "protobuf", "starlette", "more-itertools",
    "sympy", "mlx-cpu",
}  # fmt: skip
# The development venv's certifi is a local build (.post1) that PyPI does not have.
VERSION_EXCEPTIONS = {"certifi"}


@dataclass(frozen=True)
class Resource:
    name: str
    url: str
    sha256: str
    nounzip: bool

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[1]

    @property
    def project_and_version(self) -> tuple[str, str]:
        if self.wheel:
            project, version = self.filename.split("-")[:2]
            return project, version
        match = re.fullmatch(r"(.+)-(\d[^-]*)\.tar\.gz", self.filename)
        assert match, f"not an sdist: {self.filename}"
        return match[1], match[2]

    @property
    def version(self) -> str:
        return self.project_and_version[1]

    @property
    def wheel(self) -> bool:
        return self.filename.endswith(".whl")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def formula_text() -> str:
    return FORMULA.read_text()


def resources(text: str | None = None) -> list[Resource]:
    pattern = re.compile(
        r'^  resource "([^"]+)" do\n    url "([^"]+)"(, using: :nounzip)?\n'
        r'    sha256 "([^"]*)"\n  end$',
        re.M,
    )
    text = text or formula_text()
    found = [Resource(m[1], m[2], m[4], bool(m[3])) for m in pattern.finditer(text)]
    assert len(found) == text.count('  resource "'), "a resource block has an unexpected shape"
    return found


def block(name: str) -> str:
    """The body of `service do`, `test do` or `def NAME` (two-space indented, up to its end)."""
    match = re.search(rf"^  {name}\n(.*?)^  end$", formula_text(), re.M | re.S)
    assert match, f"no `{name}` block"
    return match[1]


# -- Ruby ------------------------------------------------------------------------------------


def test_formula_is_valid_ruby() -> None:
    ruby = require_tool("ruby")
    result = subprocess.run([ruby, "-c", str(FORMULA)], capture_output=True, text=True)
    assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr


def test_formula_passes_rubocop(tmp_path: Path) -> None:
    rubocop = require_tool("rubocop")
    config = tmp_path / "rubocop.yml"
    config.write_text(RUBOCOP_CONFIG)
    result = subprocess.run(
        [rubocop, "--config", str(config), "--format", "simple", str(FORMULA)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- structure -------------------------------------------------------------------------------


def test_platform_guards_and_dependencies() -> None:
    text = formula_text()
    assert re.search(r"^class Mlxd < Formula$", text, re.M)
    assert "include Language::Python::Virtualenv" in text
    for line in (
        "depends_on arch: :arm64",
        "depends_on :macos",
        'depends_on "ffmpeg" => :recommended',
    ):
        assert re.search(rf"^  {re.escape(line)}$", text, re.M), line
    python = re.search(r'^  depends_on "python@(3\.\d+)"$', text, re.M)
    assert python and f'virtualenv_create(libexec, "python{python[1]}")' in text
    assert re.search(rf'^  version "{re.escape(__version__)}"$', text, re.M)


def test_installing_needs_no_placeholder_and_taps_the_clone() -> None:
    """The formula builds the clone it lives in; README and formula say how, with no owner to
    fill in (Homebrew installs only from a tap, so the clone is tapped)."""
    text = formula_text()
    readme = (ROOT / "README.md").read_text()
    assert "OWNER" not in text and "OWNER" not in readme
    clone = 'File.expand_path("..", __dir__)'
    assert f'  url "file://#{{{clone}}}", using: :git, branch: "main"' in text
    readme_path = 'File.expand_path("../README.md", __dir__)'
    assert f'  homepage "file://#{{{readme_path}}}"' in text
    for command in ('brew tap local/mlxd "$PWD"', "brew install local/mlxd/mlxd"):
        assert command in readme and command in text
    assert "brew untap local/mlxd" in readme
    assert "./Formula/mlxd.rb" not in readme  # refused by Homebrew: not in a tap


def test_resources_are_pinned_with_sha256() -> None:
    found = resources()
    names = [r.name for r in found]
    assert len(found) >= 40 and names == sorted(names) and len(set(names)) == len(names)
    for resource in found:
        assert resource.url.startswith("https://files.pythonhosted.org/packages/"), resource
        assert re.fullmatch(r"[0-9a-f]{64}", resource.sha256), resource
        assert normalize(resource.project_and_version[0]) == normalize(resource.name), resource
        assert re.fullmatch(r"\d+(\.\d+)*(\.post\d+)?", resource.version), resource
        if resource.wheel:
            assert resource.nounzip, f"{resource.name}: a wheel must be staged unzipped"
            tags = resource.filename.removesuffix(".whl").split("-")[-1]
            assert tags == "any" or "arm64" in tags or "universal2" in tags, resource
        else:
            assert resource.filename.endswith(".tar.gz") and not resource.nounzip, resource
    assert len({r.sha256 for r in found}) == len(found)


def declared_requirements() -> dict[str, str]:
    """Requirement -> where it is declared: pyproject.toml's dependencies and requirements/
    (mlx-whisper, installed with --no-deps)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = dict.fromkeys(declared, "pyproject.toml")
    for path in sorted((ROOT / "requirements").glob("*.txt")):
        lines = (line.strip() for line in path.read_text().splitlines())
        found |= dict.fromkeys((x for x in lines if x and not x.startswith("#")), path.name)
    return found


def test_resources_are_what_mlxd_imports_and_nothing_more() -> None:
    names = {normalize(r.name) for r in resources()}
    assert not names & NOT_RESOURCES
    for requirement, source in declared_requirements().items():
        name = normalize(re.split(r"[\[<>=;! ]", requirement, maxsplit=1)[0])
        assert name in names, f"{name} (a dependency in {source}) is not a resource"
    assert {"mlx", "mlx-metal", "mlx-whisper", "gguf", "transformers", "sanic"} <= names
    assert "hf-xet" in names


def test_resource_versions_match_the_tested_environment() -> None:
    for resource in resources():
        try:
            installed = importlib.metadata.version(resource.name)
        except importlib.metadata.PackageNotFoundError:
            assert resource.name == "mlx-metal", f"{resource.name} is not installed here"
            continue
        if normalize(resource.name) not in VERSION_EXCEPTIONS:
            assert resource.version == installed, resource.name


def test_compiled_wheels_match_the_formula_python() -> None:
    python = re.search(r'depends_on "python@3\.(\d+)"', formula_text())
    assert python
    for resource in resources():
        cpython = re.search(r"-cp3(\d+)-cp3\d+-", resource.filename)
        if cpython:
            assert cpython[1] == python[1], f"{resource.filename} is not for python@3.{python[1]}"


def test_install_stages_wheels_and_ships_the_launchd_template() -> None:
    install = block("def install")
    assert 'r.url.end_with?(".whl")' in install and '"--no-deps"' in install
    assert "venv.pip_install sdists" in install
    assert "venv.pip_install_and_link buildpath" in install
    assert 'pkgshare.install "launchd"' in install
    assert (ROOT / "launchd" / "dev.mlxd.serve.plist").is_file()


def test_service_block() -> None:
    service = block("service do")
    assert re.search(
        r'^    run \[opt_bin/"mlxd", "serve", "--log-file", var/"log/mlxd.log"\]$', service, re.M
    )
    assert re.search(r"^    keep_alive true$", service, re.M)
    assert re.search(r"^    process_type :interactive$", service, re.M)
    assert re.search(r'^    log_path var/"log/[\w./-]+"$', service, re.M)
    assert re.search(r'^    error_log_path var/"log/[\w./-]+"$', service, re.M)
    environment = service[service.index("environment_variables") :]
    assert re.search(r"PATH:\s+std_service_path_env", environment)
    assert re.search(r'MLXD_HOME:\s+"#\{Dir.home\}/Library/Application Support/mlxd"', environment)


def test_caveats_name_mlxd_pull() -> None:
    caveats = block("def caveats")
    assert "mlxd pull" in caveats and "brew services start mlxd" in caveats


def test_test_block_starts_the_server_and_checks_health() -> None:
    test = block("test do")
    assert "free_port" in test and '"serve"' in test
    for flag in ("--chat-port", "--embeddings-port", "--stt-port", "--home"):
        assert f'"{flag}"' in test
    assert "/health" in test and "mlxd pull" in test
    assert 'Process.kill "TERM", pid' in test


# -- the formula's own blocks, evaluated by Ruby against a minimal stand-in for Homebrew -----

# Just enough of Homebrew's DSL to load the formula, record its service block and run its test
# block against the development install (bin = this interpreter's bin/, holding `mlxd`).
RUBY_SHIM = """\
require "json"
require "pathname"
require "socket"
require "tmpdir"

module Language; module Python; module Virtualenv; end; end; end

class Formula
  class << self
    attr_reader :test_block, :service_block

    def method_missing(*); end
    def respond_to_missing?(*) = true
    def test(&block) = (@test_block = block)
    def service(&block) = (@service_block = block)
  end

  def bin = Pathname(ENV.fetch("SHIM_BIN"))
  def testpath = (@testpath ||= Pathname(Dir.mktmpdir))
  def version = ENV.fetch("SHIM_VERSION")
  def free_port = TCPServer.open("127.0.0.1", 0) { |server| server.addr[1] }
  def quiet_system(*args) = system(*args, out: File::NULL, err: File::NULL)

  def shell_output(command)
    output = `#{command}`
    raise "#{command} failed: #{$?}" unless $?.success?
    output
  end

  def assert_match(expected, actual)
    raise "#{expected.inspect} not in #{actual.inspect}" unless actual.include?(expected)
  end
end

class ServiceRecorder
  attr_reader :calls

  def initialize = (@calls = {})
  def opt_bin = Pathname("/opt/homebrew/opt/mlxd/bin")
  def var = Pathname("/opt/homebrew/var")
  def std_service_path_env = "/opt/homebrew/bin:/opt/homebrew/sbin:/usr/bin:/bin:/usr/sbin:/sbin"
  def method_missing(name, *args) = (@calls[name] = args.map { |arg| plain(arg) })
  def respond_to_missing?(*) = true

  def plain(value)
    return value.map { |item| plain(item) } if value.is_a?(Array)
    return value.transform_values { |item| plain(item) } if value.is_a?(Hash)

    value.to_s
  end
end

load ARGV.fetch(0)
if ARGV.fetch(1) == "service"
  recorder = ServiceRecorder.new
  recorder.instance_eval(&Mlxd.service_block)
  puts JSON.generate(recorder.calls)
else
  Mlxd.new.instance_eval(&Mlxd.test_block)
  puts "test block passed"
end
"""


def run_shim(tmp_path: Path, mode: str, timeout: float = 60) -> subprocess.CompletedProcess:
    ruby = require_tool("ruby")
    shim = tmp_path / "shim.rb"
    shim.write_text(RUBY_SHIM)
    environment = clean_env(SHIM_BIN=str(Path(sys.executable).parent), SHIM_VERSION=__version__)
    environment = {k: v for k, v in environment.items() if not k.startswith("MLXD_")}
    return subprocess.run(
        [ruby, str(shim), str(FORMULA), mode],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def test_service_block_evaluates_to_the_right_settings(tmp_path: Path) -> None:
    result = run_shim(tmp_path, "service")
    assert result.returncode == 0, result.stderr
    calls = json.loads(result.stdout)
    log = "/opt/homebrew/var/log/mlxd.log"
    assert calls["run"] == [["/opt/homebrew/opt/mlxd/bin/mlxd", "serve", "--log-file", log]]
    assert calls["keep_alive"] == ["true"] and calls["process_type"] == ["interactive"]
    assert calls["log_path"][0].startswith("/opt/homebrew/var/log/")
    assert calls["error_log_path"][0].startswith("/opt/homebrew/var/log/")
    environment = calls["environment_variables"][0]
    assert environment["PATH"].startswith("/opt/homebrew/bin:")
    assert environment["MLXD_HOME"] == f"{Path.home()}/Library/Application Support/mlxd"


def test_test_block_passes_against_the_development_install(tmp_path: Path) -> None:
    require_tool("curl")
    result = run_shim(tmp_path, "test", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "test block passed" in result.stdout


# -- the resources are sufficient: a fresh venv with exactly them runs the end-to-end tests ----


def fresh_requirements() -> list[str]:
    """The formula's resources as pins; on Linux MLX's CPU backend replaces mlx-metal."""
    pins = {normalize(r.name): r.version for r in resources()}
    if sys.platform != "darwin":
        pins["mlx-cpu"] = pins.pop("mlx-metal")
    return [f"{name}=={version}" for name, version in sorted(pins.items())]


def clean_env(**extra: str) -> dict[str, str]:
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTHONSTARTUP")
    environment = {k: v for k, v in os.environ.items() if k not in drop}
    environment.update(extra)
    return environment


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("formula-venv")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    requirements = tmp / "requirements.txt"
    requirements.write_text("\n".join(fresh_requirements()) + "\n")
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    command += ["--no-deps", "--no-compile", "-r", str(requirements)]
    subprocess.run(command, check=True, timeout=600, env=clean_env())
    yield python


def run_fresh(python: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=clean_env(PYTHONPATH=str(ROOT)),
    )


def test_fresh_venv_holds_exactly_the_resources(fresh_python: Path) -> None:
    listing = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(fresh_python), "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    installed = {normalize(p["name"]) for p in json.loads(listing.stdout)} - {"pip"}
    assert installed == {pin.split("==")[0] for pin in fresh_requirements()}
    result = run_fresh(fresh_python, "-c", "import torch")
    assert result.returncode != 0 and "No module named 'torch'" in result.stderr


def test_fresh_venv_imports_every_module_and_converts(fresh_python: Path, tmp_path: Path) -> None:
    modules = sorted(
        ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for package in ("engine", "conversions")
        for path in (ROOT / package).rglob("*.py")
        if path.stem not in ("__main__", "__init__")
    )
    code = f"import importlib\nfor m in {modules!r}: importlib.import_module(m)\nimport gguf"
    imported = run_fresh(fresh_python, "-c", code)
    assert imported.returncode == 0, imported.stderr
    from tests.tiny.bert import build_bge_hf

    source = build_bge_hf(tmp_path / "bge-hf")
    home = str(tmp_path / "home")
    converted = run_fresh(fresh_python, "-m", "engine", "convert", "embeddings", str(source),
                          "--as", "tiny-bge", "--home", home)  # fmt: skip
    assert converted.returncode == 0, converted.stderr
    listed = run_fresh(fresh_python, "-m", "engine", "models", "--home", home)
    assert "tiny-bge" in listed.stdout


# The end-to-end tests run in this (the development) interpreter, which builds the tiny models
# and drives the clients, while `mlxd serve` and its service processes run from the fresh venv:
# tests/serving.py starts the server with sys.executable, pointed here at the fresh python.
DRIVER = """\
import subprocess, sys
fresh, record = sys.argv[1], sys.argv[2]
sys.executable = fresh
original = subprocess.Popen.__init__

def recording(self, args, *rest, **kwargs):
    if isinstance(args, list) and args[1:4] == ["-m", "engine", "serve"]:
        with open(record, "a") as out:
            out.write(args[0] + "\\n")
    original(self, args, *rest, **kwargs)

subprocess.Popen.__init__ = recording
import pytest
sys.exit(pytest.main(sys.argv[3:]))
"""


def test_end_to_end_tests_pass_with_only_the_resources(fresh_python: Path, tmp_path: Path) -> None:
    record = tmp_path / "servers.txt"
    command = [sys.executable, "-c", textwrap.dedent(DRIVER), str(fresh_python), str(record)]
    command += ["-q", "-p", "no:cacheprovider", "tests/engine/test_end_to_end.py"]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=clean_env(PYTHONPATH=str(ROOT)),
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout
    assert set(record.read_text().split()) == {str(fresh_python)}
