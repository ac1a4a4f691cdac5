"""The documented commands work: the runnable blocks of docs/quickstart.md and docs/cli.md run.

The marker
----------
A fenced ``sh`` or ``python`` block is *runnable* when the line right before its opening fence
is an HTML comment starting with ``runnable`` (GitHub does not render the comment, and the block
keeps its highlighting)::

    <!-- runnable -->
    ```sh
    fedtransport route check route_tables/pulsar_route_table.yaml && echo usable
    ```

Options follow the word, separated by spaces:

``file=NAME``
    the block is not run by itself: it is saved as ``NAME`` in the working directory of every
    later runnable block of the same section (``broker.py`` and ``party.py`` of the quickstart).
``needs=PROGRAM``
    the block runs only where ``PROGRAM`` is installed (``rabbitmq-server``), else it is skipped.
``slow``
    the test carries pytest's ``slow`` mark and a longer time limit (a real benchmark run).

How a block runs
----------------
Each block runs in a fresh temporary directory holding what the docs assume of the repository
root: a copy of ``route_tables/`` and of ``benchmarks/results/throughput-*.json``, and ``.venv``
as a link to the virtualenv running the tests, whose ``bin`` also comes first on ``PATH`` (so
``fedtransport`` and ``python`` are the project's). A ``sh`` block runs with ``bash -e``, a
``python`` block with ``python``, both with a time limit. TMPDIR is a directory of the block's
own, so a broker's run directory left behind shows. Every process a block starts carries a
marker in its environment; after the block, none may be left (a broker orphaned by its
launcher, for example), and the test kills any that is. A failure shows the block's text and
its output.

Substitutions (the only changes to a block's text, each checked to still apply): the Pulsar
sequence of the quickstart needs the port that ``broker.py`` prints, so the test sends the
broker's output to ``broker.out``, waits for the URL there and puts it where the block says
``pulsar://127.0.0.1:PORT``. See ``SUBSTITUTIONS``.

Blocks that stay unmarked are listed in ``NOT_RUNNABLE`` with the reason and what in the block
shows it (a remote broker address, an install from the network, a name defined only by an
earlier block). A block that is neither marked nor listed fails the test, so an accidental
un-marking does; ``MARKED`` fixes the marked blocks the same way.

Besides running the blocks, the tests below check sample outputs of docs/cli.md against what the
code prints (``...`` in a sample stands for any lines).
"""

from __future__ import annotations

import ast
import builtins
import contextlib
import http.server
import inspect
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fedtransport.brokers import RabbitNode
from fedtransport.cli import main
from fedtransport.demo import _DEMO_TIMEOUT

ROOT = Path(__file__).resolve().parent.parent
DOCS = ("quickstart.md", "cli.md")
COMMAND_LANGS = {"sh", "bash", "shell", "python", "py"}
MARKER = re.compile(r"^<!--\s*runnable\b(?P<options>.*?)-->\s*$")
FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<info>.*)$")
ENV_MARK = "FEDTRANSPORT_DOCS_TEST"
BLOCK_TIMEOUT = 300.0
SLOW_BLOCK_TIMEOUT = 1200.0
# What one `fedtransport demo` allows itself: a local broker's start (RabbitMQ's is the longest),
# both parties, then their join and the broker's stop. A block's limit is above it, so a demo slow
# under load ends with its own report instead of being cut off by the test after 300 s.
_NODE_START = inspect.signature(RabbitNode).parameters["start_timeout"].default
DEMO_BOUND = float(_NODE_START) + _DEMO_TIMEOUT + 120.0
GONE_WITHIN = 30.0  # seconds a block's processes get to end after the block itself

NEEDS: dict[str, Callable[[], bool]] = {"rabbitmq-server": RabbitNode.installed}


# ---------------------------------------------------------------------------- the Markdown


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    section: str
    marked: bool = False
    options: dict[str, str] = field(default_factory=dict)

    @property
    def first_line(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"


def parse_blocks(doc: str) -> list[Block]:
    """Every fenced block of ``docs/DOC``, with its marker options if it is runnable."""
    lines = (ROOT / "docs" / doc).read_text().splitlines()
    blocks: list[Block] = []
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if MARKER.match(line) and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            raise AssertionError(f"docs/{doc}:{i + 1}: a runnable marker must be right before a code fence")
        opening = FENCE.match(line)
        if opening is None:
            if line.startswith("#"):
                section = line.lstrip("#").strip()
            i += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            body.append(lines[j])
            j += 1
        marker = MARKER.match(lines[i - 1]) if i > 0 else None
        options: dict[str, str] = {}
        if marker:
            for word in marker["options"].split():
                key, _, value = word.partition("=")
                options[key] = value
        lang = info.split()[0] if info else ""
        blocks.append(Block(doc, i + 1, lang, "\n".join(body) + "\n", section, marker is not None, options))
        i = j + 1
    return blocks


ALL_BLOCKS = [b for doc in DOCS for b in parse_blocks(doc)]
COMMAND_BLOCKS = [b for b in ALL_BLOCKS if b.lang in COMMAND_LANGS]

# The runnable blocks, by first line: a block that loses its marker (or a new one) fails below.
MARKED: dict[str, list[str]] = {
    "quickstart.md": [
        ".venv/bin/fedtransport demo                      # two processes, an embedded Pulsar broker",
        ".venv/bin/fedtransport demo --backend rabbitmq   # a throw-away local RabbitMQ node",
        "import numpy as np",
        "# broker.py: keeps a local Pulsar-protocol broker up until Ctrl-C or kill",
        "# party.py: python party.py guest|host pulsar://127.0.0.1:PORT",
        "python broker.py &                          # prints the service URL, pulsar://127.0.0.1:PORT",
    ],
    "cli.md": [
        "fedtransport demo                      # two processes, an embedded Pulsar-protocol broker",
        "fedtransport demo --backend rabbitmq   # a throw-away local RabbitMQ node (needs rabbitmq-server)",
        "fedtransport route show route_tables/pulsar_star_route_table.yaml",
        "fedtransport route check route_tables/pulsar_route_table.yaml && echo usable",
        "fedtransport certs --domain fate.org --party 9999 --party 10000 --proxy proxy --out ./certs",
        "fedtransport bench --backend pulsar --repeat 2 --json pulsar.json",
        "fedtransport bench --backend rabbitmq --mode federated --only raw-large object table",
        "fedtransport bench --from-json benchmarks/results/throughput-*.json --chart docs/benchmarks.png",
    ],
}


@dataclass(frozen=True)
class NotRunnable:
    why: str
    kind: str  # "remote": needs the broker at `evidence`; "install": does `evidence`; "fragment": uses `evidence`
    evidence: str


_CLEANUP = "fedtransport cleanup --backend rabbitmq --job job-42 --option host=10.0.0.5 --option user=admin"
_DOCTOR = "fedtransport doctor --backend rabbitmq --option host=10.0.0.5 --option user=admin"
_SECRET = " --option password=secret"

# The command blocks that stay unmarked, by (doc, first line), with what in the block shows why.
NOT_RUNNABLE: dict[tuple[str, str], NotRunnable] = {
    ("quickstart.md", "python3 -m venv .venv"): NotRunnable(
        "makes the virtualenv these tests run in, installing from the package index", "install", "pip install"
    ),
    ("quickstart.md", 'fed = ft.Federation.connect("rabbitmq", job_id="job-3", party=guest, options={'): NotRunnable(
        "connects to a RabbitMQ broker at 10.0.0.5 with its administrator's password", "remote", "10.0.0.5"
    ),
    ("quickstart.md", "fed.close()      # connections and threads; broker resources stay"): NotRunnable(
        "continues a session opened by an earlier block (the RabbitMQ one at 10.0.0.5)", "fragment", "fed"
    ),
    ("cli.md", _CLEANUP + _SECRET): NotRunnable(
        "deletes a job on the brokers at 10.0.0.5, 10.0.0.4 and 192.168.0.4 (route table)", "remote", "10.0.0.5"
    ),
    ("cli.md", _DOCTOR + _SECRET): NotRunnable(
        "checks the brokers at 10.0.0.5, 10.0.0.4 and 192.168.0.4 (route table)", "remote", "10.0.0.5"
    ),
}

# Text replaced in a block before it runs: (regular expression, replacement) pairs by (doc, first line),
# applied line by line (re.MULTILINE); each must match.
_WAIT_FOR_URL = """BROKER=$!
# test: wait (bounded) for the URL broker.py prints, what a reader copies into PORT
for _ in $(seq 600); do grep -q '^pulsar://' broker.out 2>/dev/null && break; kill -0 $BROKER; sleep 0.1; done
SERVICE_URL=$(grep -m1 '^pulsar://' broker.out)"""
SUBSTITUTIONS: dict[tuple[str, str], list[tuple[str, str]]] = {
    ("quickstart.md", MARKED["quickstart.md"][5]): [
        (r"^python broker\.py &.*$", "python broker.py > broker.out 2>&1 &    # test: its output to a file"),
        (r"^BROKER=\$!$", _WAIT_FOR_URL.replace("\\", "\\\\")),
        (r"pulsar://127\.0\.0\.1:PORT", '"$SERVICE_URL"'),
    ],
}

_SUM = "[3. 3. 3. 3.]"
_DEMO_OK = "result: both sums match the plain sum, the table came back unchanged and the model arrived intact"

# What a block's output must hold, and files it must leave in its working directory.
EXPECT: dict[str, list[str]] = {
    MARKED["quickstart.md"][0]: ["backend pulsar (embedded broker at pulsar://127.0.0.1:", "backend memory", _DEMO_OK],
    MARKED["quickstart.md"][1]: ["backend rabbitmq", _DEMO_OK],
    MARKED["quickstart.md"][2]: ["4 400"],
    MARKED["quickstart.md"][5]: [f"guest sum: {_SUM}", f"host sum: {_SUM}"],
    MARKED["cli.md"][0]: ["backend pulsar (embedded broker at pulsar://127.0.0.1:", "backend memory", _DEMO_OK],
    MARKED["cli.md"][1]: ["backend rabbitmq", _DEMO_OK],
    MARKED["cli.md"][2]: [
        "party 8888 (not listed: from the default section)",
        '"source": "route_tables/rabbitmq_route_table.yaml"',
    ],
    MARKED["cli.md"][3]: ["route_tables/pulsar_route_table.yaml: OK (pulsar; parties 9999, 10000)", "usable"],
    MARKED["cli.md"][4]: ["CA (new):", "CA (reused):", "party 9999: answers to SNI 9999.fate.org, 192.168.0.4"],
    MARKED["cli.md"][5]: ["ratio object / raw-large", "ratio table / raw-large", "ratio table-64 / raw-large"],
    MARKED["cli.md"][6]: ["ratio object / raw-large", "ratio table / raw-large"],
    MARKED["cli.md"][7]: ["chart written to docs/benchmarks.png"],
}
EXPECT_FILES: dict[str, list[str]] = {
    MARKED["cli.md"][4]: [
        "certs/ca.cert.pem",
        "certs/ca.key.pem",
        "certs/8888.fate.org/broker.key-pk8.pem",
        "certs/10000.fate.org/broker.pem",
        "certs/proxy.fate.org/proxy.pem",
    ],
    MARKED["cli.md"][5]: ["pulsar.json"],
    MARKED["cli.md"][7]: ["docs/benchmarks.png"],
}


# ---------------------------------------------------------------------------- what is marked


def test_marked_blocks_are_the_expected_ones() -> None:
    for doc in DOCS:
        marked = [b.first_line for b in COMMAND_BLOCKS if b.doc == doc and b.marked]
        assert marked == MARKED[doc], f"docs/{doc}: the runnable blocks changed"
    assert len([b for b in COMMAND_BLOCKS if b.marked]) == 14
    for b in ALL_BLOCKS:
        assert not b.marked or b.lang in COMMAND_LANGS, f"{b.id}: only sh and python blocks can be runnable"
        assert set(b.options) <= {"file", "needs", "slow"}, f"{b.id}: unknown marker option in {b.options}"
        if "needs" in b.options:
            assert b.options["needs"] in NEEDS, f"{b.id}: the test cannot tell whether {b.options['needs']} is there"


def test_every_unmarked_block_is_one_that_cannot_run() -> None:
    unmarked = {(b.doc, b.first_line): b for b in COMMAND_BLOCKS if not b.marked}
    assert set(unmarked) == set(NOT_RUNNABLE), "an unmarked block must be listed in NOT_RUNNABLE with its reason"
    for key, reason in NOT_RUNNABLE.items():
        block = unmarked[key]
        if reason.kind == "remote":
            assert reason.evidence in block.text and not reason.evidence.startswith("127."), block.id
        elif reason.kind == "install":
            assert reason.evidence in block.text, block.id
        else:
            assert reason.kind == "fragment"
            assert reason.evidence in _undefined_names(block.text), f"{block.id}: {reason.evidence} is defined here"


def _undefined_names(code: str) -> set[str]:
    """Names a Python block reads without assigning or importing them (nor builtins)."""
    tree = ast.parse(code)
    bound: set[str] = set(dir(builtins))
    loaded: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
    return loaded - bound


# ---------------------------------------------------------------------------- running the blocks


def _runnable() -> list[Any]:
    params = []
    for b in COMMAND_BLOCKS:
        if not b.marked or "file" in b.options:
            continue
        marks: list[pytest.MarkDecorator] = []
        if "slow" in b.options:
            marks += [pytest.mark.slow, pytest.mark.timeout(block_timeout(b) + 120)]
        else:
            marks.append(pytest.mark.timeout(block_timeout(b) + 60))
        params.append(pytest.param(b, id=b.id, marks=marks))
    return params


def block_timeout(block: Block) -> float:
    """A block's time limit: its base, plus ``DEMO_BOUND`` for each ``fedtransport demo`` it runs."""
    base = SLOW_BLOCK_TIMEOUT if "slow" in block.options else BLOCK_TIMEOUT
    demos = re.findall(r"^\S*fedtransport demo\b", block.text, re.MULTILINE)
    return base + DEMO_BOUND * len(demos)


def _marked_processes(token: str) -> list[tuple[int, str]]:
    """Live processes (not zombies) whose environment carries this block's marker."""
    want = f"{ENV_MARK}={token}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if want not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if state != "Z":
            found.append((int(entry.name), cmdline))
    return found


def _kill_all(token: str, group: int | None) -> None:
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for pid, _ in _marked_processes(token):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def _workspace(ws: Path, block: Block) -> None:
    shutil.copytree(ROOT / "route_tables", ws / "route_tables")
    results = ws / "benchmarks" / "results"
    results.mkdir(parents=True)
    for f in (ROOT / "benchmarks" / "results").glob("throughput-*.json"):
        shutil.copy(f, results / f.name)
    (ws / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
    for earlier in COMMAND_BLOCKS:  # file= blocks of the same section, before this one
        same_section = earlier.doc == block.doc and earlier.section == block.section
        if same_section and earlier.line < block.line and "file" in earlier.options:
            (ws / earlier.options["file"]).write_text(earlier.text)


def _script(block: Block) -> str:
    text = block.text
    for pattern, replacement in SUBSTITUTIONS.get((block.doc, block.first_line), []):
        text, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert n, f"{block.id}: the test's substitution of {pattern!r} no longer applies; update SUBSTITUTIONS"
    return text


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds a block's processes through /proc")
@pytest.mark.parametrize("block", _runnable())
def test_runnable_block(block: Block, tmp_path: Path) -> None:
    need = block.options.get("needs")
    if need and not NEEDS[need]():
        pytest.skip(f"{block.id} needs {need}")
    if "fedtransport bench" in block.text:
        pytest.importorskip("numpy")
        pytest.importorskip("matplotlib")
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "fedtransport").exists(), "the package is installed with its console script"
    ws = tmp_path / "ws"
    ws.mkdir()
    _workspace(ws, block)
    script = _script(block)
    if block.lang in ("python", "py"):
        (ws / "block.py").write_text(script)
        argv = ["python", "block.py"]
    else:
        (ws / "block.sh").write_text(script)
        argv = ["bash", "-e", "block.sh"]
    token = f"{os.getpid()}-{block.doc}-{block.line}"
    private_tmp = Path(tempfile.mkdtemp(prefix="ftdocs-"))  # short: AF_UNIX paths of multiprocessing live here
    env = {**os.environ, ENV_MARK: token, "TMPDIR": str(private_tmp), "PYTHONUNBUFFERED": "1"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)
    log = ws / "output.txt"
    timeout = block_timeout(block)
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, cwd=ws, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            code: int | None = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            code = None
        deadline = time.monotonic() + GONE_WITHIN
        while _marked_processes(token) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _marked_processes(token)
        left_dirs = sorted(p.name for p in private_tmp.iterdir() if p.name.startswith("fedtransport-"))

        def failure(what: str) -> str:
            extra = ""
            if (ws / "broker.out").exists():
                extra = f"\n--- broker.out ---\n{(ws / 'broker.out').read_text(errors='replace')}"
            return (
                f"docs/{block.id}: {what}\n--- the block (as run) ---\n{script}"
                f"--- its output ---\n{log.read_text(errors='replace')}{extra}"
            )

        assert code is not None, failure(f"did not finish within {timeout:.0f} s")
        assert code == 0, failure(f"exit code {code}")
        output = log.read_text(errors="replace")
        for text in EXPECT.get(block.first_line, []):
            assert text in output, failure(f"the output lacks {text!r}")
        for name in EXPECT_FILES.get(block.first_line, []):
            assert (ws / name).is_file(), failure(f"{name} was not written")
        assert not left, failure(
            f"processes left running {GONE_WITHIN:.0f} s after the block ended: "
            + "; ".join(f"{pid} {cmd}" for pid, cmd in left)
        )
        assert not left_dirs, failure(f"run directories left in TMPDIR: {left_dirs}")
    finally:
        _kill_all(token, proc.pid if proc is not None else None)
        shutil.rmtree(private_tmp, ignore_errors=True)


# ---------------------------------------------------------------------------- sample outputs of cli.md


def _output_block(doc: str, first_line: str) -> str:
    found = [b.text for b in ALL_BLOCKS if b.doc == doc and not b.lang and b.first_line.startswith(first_line)]
    assert len(found) == 1, f"docs/{doc}: one output block starting {first_line!r}, found {len(found)}"
    return found[0]


def assert_sample(sample: str, actual: str) -> None:
    """``actual`` has the lines of ``sample`` in order, where a line ``...`` stands for any lines."""
    pattern = ""
    for line in sample.rstrip("\n").splitlines():
        pattern += r"(?:.*\n)*?" if line.strip() == "..." else re.escape(line.rstrip()) + r"\n"
    text = "".join(line.rstrip() + "\n" for line in actual.splitlines())
    assert re.fullmatch(pattern, text), f"the sample\n{sample}\ndoes not match the output\n{actual}"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_route_samples_match(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    table = "route_tables/pulsar_star_route_table.yaml"
    code, out, _ = run_cli(capsys, "route", "show", table, "--party", "8888")
    assert code == 0
    assert_sample(_output_block("cli.md", f"route table {table}"), out)
    code, out, _ = run_cli(capsys, "route", "check", "route_tables/pulsar_route_table.yaml")
    assert code == 0
    assert_sample(_output_block("cli.md", "route_tables/pulsar_route_table.yaml: OK"), out + "usable\n")


def test_route_check_error_sample_matches(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sample = _output_block("cli.md", "fedtransport route check: route table")
    original = (ROOT / "route_tables" / "pulsar_route_table.yaml").read_text()
    broken, n = re.subn(r"(9999:\n  host: .*\n  port: )6650", r"\g<1>six", original)
    assert n == 1
    (tmp_path / "my_route_table.yaml").write_text(broken)  # the sample's "copy of that table with port: six"
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "route", "check", "my_route_table.yaml")
    assert code == 1 and not out
    assert_sample(sample, err)


def test_certs_sample_matches(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    [block] = [b for b in COMMAND_BLOCKS if b.first_line.startswith("fedtransport certs ")]
    first = block.first_line.split()[1:]  # the first command, without "fedtransport"
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, *first)
    assert code == 0
    assert_sample(_output_block("cli.md", "CA (new):"), out)
    for key in ("certs/ca.key.pem", "certs/9999.fate.org/broker.key-pk8.pem", "certs/proxy.fate.org/proxy.pem"):
        assert (tmp_path / key).stat().st_mode & 0o777 == 0o600, key


@contextlib.contextmanager
def _fake_rabbitmq_refusing_the_password() -> Iterator[tuple[int, int]]:
    """(AMQP port, management port) on 127.0.0.1: AMQP 0-9-1 answers, the management API says 401."""
    amqp = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve_amqp() -> None:
        amqp.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = amqp.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(5)
                with contextlib.suppress(OSError):
                    conn.recv(8)  # the protocol header
                    conn.sendall(b"\x01\x00\x00\x00\x00\x00\x10")  # a method frame on channel 0: connection.start

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"error":"not_authorised","reason":"Login failed"}'
            self.send_response(401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    http_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threads = [threading.Thread(target=serve_amqp, daemon=True), threading.Thread(target=http_server.serve_forever)]
    for t in threads:
        t.start()
    try:
        yield amqp.getsockname()[1], http_server.server_address[1]
    finally:
        stop.set()
        http_server.shutdown()
        http_server.server_close()
        for t in threads:
            t.join(10)
        amqp.close()


def test_doctor_sample_matches(capsys: pytest.CaptureFixture[str]) -> None:
    [block] = [b for b in COMMAND_BLOCKS if b.first_line.startswith("fedtransport doctor --backend rabbitmq")]
    host = re.search(r"--option host=(\S+)", block.first_line)
    assert host is not None
    sample = _output_block("cli.md", "fedtransport doctor: rabbitmq")
    assert f"RabbitMQ at {host[1]}:" in sample, "the sample output is of the example's broker"
    with _fake_rabbitmq_refusing_the_password() as (amqp_port, mng_port):
        # the same command against a local stand-in: its address and ports go into the sample
        argv = block.first_line.split()[1:]
        argv = [a.replace(f"host={host[1]}", "host=127.0.0.1") for a in argv]
        code, out, _ = run_cli(capsys, *argv, f"--option=port={amqp_port}", f"--option=mng_port={mng_port}")
    assert code == 1
    expected = sample.replace(host[1], "127.0.0.1")
    expected = re.sub(r"\b15672\b", str(mng_port), expected)
    expected = re.sub(r"\b5672\b", str(amqp_port), expected)
    assert_sample(expected, out)
