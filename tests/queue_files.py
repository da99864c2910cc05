"""Write queue files the way docs/protocol.md says a client does (for the daemon's tests)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import perpetual_motion as pm


def submit(instance: Path, name: str, body: str, priority: int = 500, cwd: str | None = None,
           mode: int = 0o644, gpus: str | int | None = None, nodes: str | int | None = None,
           after: tuple[str, ...] = (), args: tuple[str, ...] = (), **extra: str) -> str:
    """Publish a task with its submit record (when anything goes into one); its id."""
    for folder in ("pending", "records", ".staging"):
        (instance / folder).mkdir(parents=True, exist_ok=True)
    task_id = f"{priority:03d}-{pm.unique_name()}-{name}"
    record: dict[str, object] = {}
    if cwd is not None:
        record["cwd"] = cwd
    if gpus is not None:
        record["gpus"] = gpus
    if nodes is not None:
        record["nodes"] = nodes
    if after:
        record["after"] = " ".join(after)
    if args:
        record["argc"] = len(args)
        record.update({f"arg.{i}": arg for i, arg in enumerate(args)})
    record.update(extra)
    if record:
        record.update({"id": task_id, "name": name, "priority": f"{priority:03d}",
                       "submitted": f"{time.time():.3f}", "submitted_by": "tester@test"})
        staged = instance / ".staging" / f".{task_id}.submit"
        staged.write_text(pm.format_fields(record))
        os.rename(staged, instance / "records" / f"{task_id}.submit")
    staged = instance / ".staging" / f".{task_id}"
    staged.write_text(body)
    staged.chmod(mode)
    os.rename(staged, instance / "pending" / task_id)
    return task_id


def command(instance: Path, action: str, task: str = "") -> str:
    """Publish a command; its unique name (the reply is replies/<name>.reply)."""
    for folder in ("commands", ".staging"):
        (instance / folder).mkdir(parents=True, exist_ok=True)
    name = pm.unique_name()
    staged = instance / ".staging" / f".{name}.cmd"
    staged.write_text(pm.format_fields({"action": action, "task": task,
                                        "sent": f"{time.time():.3f}", "sent_by": "tester@test"}))
    os.rename(staged, instance / "commands" / f"{name}.cmd")
    return name


def result(instance: Path, task_id: str) -> dict[str, str] | None:
    path = instance / "records" / f"{task_id}.result"
    if not path.exists():
        return None
    return pm.parse_fields(path.read_text())


def finished(instance: Path, task_id: str) -> str | None:
    """'done' or 'failed' once the task has been moved there."""
    for folder in ("done", "failed"):
        if (instance / folder / task_id).exists():
            return folder
    return None
