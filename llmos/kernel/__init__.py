"""The OS half of llmos: programs run as processes, tools are system calls.

`from llmos.kernel import Kernel, Program, tool`."""

from llmos.kernel.kernel import Kernel, KernelError
from llmos.kernel.process import Process, Status
from llmos.kernel.program import Limits, Program, ProgramError
from llmos.kernel.tools import Policy, ToolResult, execute, tool

__all__ = [
    "Kernel",
    "KernelError",
    "Limits",
    "Policy",
    "Process",
    "Program",
    "ProgramError",
    "Status",
    "ToolResult",
    "execute",
    "tool",
]
