"""The sub-agent system calls as a model sees them (their schemas come from these signatures).
The kernel runs them (`children.py`): outside a kernel's process there is no one to fork, and
they refuse."""

from __future__ import annotations

from llmos.kernel.sandbox import Refused
from llmos.kernel.toolspec import tool

OUTSIDE = "{} is a kernel system call: it runs only in a process of a Kernel"
NAMES = ("spawn_agent", "wait_agents", "map_agents")


@tool
def spawn_agent(program: str, input: str) -> str:
    """Start a sub-agent: a child process that runs a program on an input. Returns its pid at
    once; wait_agents gives its answer.

    Args:
        program: "self" (this program), or a program file (.yaml, .json) in the workspace.
        input: The child's task.
    """
    raise Refused(OUTSIDE.format("spawn_agent"))


@tool(read_only=True)
def wait_agents(pids: list[int], timeout: float = 300.0) -> str:
    """Wait for sub-agents to finish. Returns each one's pid, status and answer.

    Args:
        pids: The children to wait for (pids that spawn_agent returned).
        timeout: Seconds to wait at most; a child still running then is reported as running.
    """
    raise Refused(OUTSIDE.format("wait_agents"))


@tool
def map_agents(program: str, inputs: list[str]) -> str:
    """Run one program over many inputs, one sub-agent each, in parallel. Returns their
    answers in the order of the inputs.

    Args:
        program: "self" (this program), or a program file (.yaml, .json) in the workspace.
        inputs: One task per child.
    """
    raise Refused(OUTSIDE.format("map_agents"))
