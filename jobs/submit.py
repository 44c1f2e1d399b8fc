"""Submit `ssm train` / `ssm score` to a running Ray cluster through the Ray job API.

The job runs this project's own `cli.py` from a working directory that Ray uploads from here, so what runs
on the cluster is exactly the code on this machine. Only the code ships: the files matched by PACKAGE are
copied into a fresh folder and that folder is the job's working directory, so credentials (.env, .aws/, token
files), virtualenvs, datasets and outputs (Parquet, HTML reports, runs/) that sit beside the code never leave
this machine. Ray's token authentication is honoured: the token comes from --token-file, RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, in that order (--token still works but is deprecated: a token on the
command line is visible to every user of the machine in the process list).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("train", "score")
# The job package: what `python cli.py ...` needs on the cluster, relative to the project root. Nothing else is
# uploaded; hidden files and folders are skipped even where a pattern would match them.
PACKAGE = ("cli.py", "pyproject.toml", "cluster.yaml", "README.md", "ssm/**/*.py", "jobs/**/*.py")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """The cluster refused or could not be reached; the message says what to do."""


def find_token(token: str | None = None, token_file: str | os.PathLike | None = None) -> str | None:
    """The Ray auth token: --token-file, then --token (deprecated), RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ~/.ray/auth_token; None when there is none."""
    if token_file is not None:
        path = Path(token_file).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as e:
            raise SubmitError(f"--token-file {path}: cannot read it ({e.strerror or e})") from e
        if not text:
            raise SubmitError(f"--token-file {path} is empty")
        return text
    if token:
        return token.strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if path and Path(path).is_file():
            text = Path(path).read_text().strip()
            if text:
                return text
    return None


@contextlib.contextmanager
def package(working_dir: str | Path = PROJECT_ROOT) -> Iterator[Path]:
    """A temporary folder holding only the PACKAGE files of `working_dir`: the job's working directory."""
    root = Path(working_dir).resolve()
    with tempfile.TemporaryDirectory(prefix="ssm-job-") as tmp:
        for pattern in PACKAGE:
            for src in sorted(root.glob(pattern)):
                rel = src.relative_to(root)
                if not src.is_file() or any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                    continue
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, Path(tmp) / rel)
        if not (Path(tmp) / "cli.py").is_file():
            raise SubmitError(f"{root} has no cli.py: submit from the ssm project folder")
        yield Path(tmp)


def _client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # connection refused, 401/403 on the version probe, bad address
        raise SubmitError(_explain(address, e, token)) from e


def _explain(address: str, error: Exception, token: str | None) -> str:
    text = str(error)
    if "401" in text or "Unauthorized" in text or "Authentication required" in text:
        return (f"the cluster at {address} requires a token and none was sent: set RAY_AUTH_TOKEN, pass --token-file, "
                "or copy the head node's ~/.ray/auth_token (ray get-auth-token) to this machine")
    if "403" in text or "Forbidden" in text or "Authentication failed" in text:
        return f"the cluster at {address} refused the token{' given' if token else ''}: check it against `ray get-auth-token` on the head node"
    return f"cannot reach the Ray job API at {address} ({text.splitlines()[0] if text else type(error).__name__}): is the cluster up and the dashboard port (8265) reachable?"


def submit(
    kind: str,
    args: Sequence[str],
    address: str,
    token: str | None = None,
    working_dir: str | Path = PROJECT_ROOT,
    env: dict[str, str] | None = None,
    pip: Sequence[str] | None = None,
    agent_wait_s: float = 120.0,
    token_file: str | os.PathLike | None = None,
) -> str:
    """Submit `ssm KIND ARGS...` to the cluster with the code of `working_dir` (see `package`); returns the job id."""
    if kind not in KINDS:
        raise SubmitError(f"unknown job kind {kind!r}: use one of {', '.join(KINDS)}")
    token = find_token(token, token_file)
    client = _client(address, token)
    entrypoint = shlex.join(["python", "cli.py", kind, *args])
    deadline = time.monotonic() + agent_wait_s
    with package(working_dir) as code:  # uploaded by submit_job before it returns
        runtime_env: dict = {"working_dir": str(code)}
        if env:
            runtime_env["env_vars"] = dict(env)
        if pip:
            runtime_env["pip"] = list(pip)
        while True:
            try:
                return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            except Exception as e:
                # A head that has just started serves the API before its job agent is up: wait for it.
                if "No available agent" in str(e) and time.monotonic() < deadline:
                    time.sleep(2)
                    continue
                raise SubmitError(_explain(address, e, token)) from e


def follow(job_id: str, address: str, token: str | None = None, echo: Callable[[str], None] = print,
           poll_s: float = 1.0, token_file: str | os.PathLike | None = None) -> str:
    """Print the job's logs as they come until it ends; returns its final status name."""
    client = _client(address, find_token(token, token_file))
    shown = 0
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            echo(logs[shown:].rstrip("\n"))
            shown = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)
