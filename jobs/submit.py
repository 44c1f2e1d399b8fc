"""Submit `ssm train` / `ssm score` to a running Ray cluster through the Ray job API.

The job runs this project's own `cli.py` from a working directory that Ray uploads from here, so what runs
on the cluster is exactly the code on this machine. Ray's token authentication is honoured: the token comes
from --token, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, in that order.
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
KINDS = ("train", "score")
# Not uploaded with the working directory: outputs, caches and version control.
EXCLUDES = [".git", "**/__pycache__", "*.egg-info", "runs", "out", "demo_out", ".whl", ".gl", ".pytest_cache"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(RuntimeError):
    """The cluster refused or could not be reached; the message says what to do."""


def find_token(token: str | None = None) -> str | None:
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
        return (f"the cluster at {address} requires a token and none was sent: pass --token, set RAY_AUTH_TOKEN, "
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
) -> str:
    """Submit `ssm KIND ARGS...` to the cluster; returns the job id."""
    if kind not in KINDS:
        raise SubmitError(f"unknown job kind {kind!r}: use one of {', '.join(KINDS)}")
    token = find_token(token)
    client = _client(address, token)
    runtime_env: dict = {"working_dir": str(working_dir), "excludes": EXCLUDES}
    if env:
        runtime_env["env_vars"] = dict(env)
    if pip:
        runtime_env["pip"] = list(pip)
    entrypoint = shlex.join(["python", "cli.py", kind, *args])
    deadline = time.monotonic() + agent_wait_s
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
           poll_s: float = 1.0) -> str:
    """Print the job's logs as they come until it ends; returns its final status name."""
    client = _client(address, find_token(token))
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
