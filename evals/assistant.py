"""llmos's own default agent (`llmos run "question"`), as a program file the suites name."""

from llmos.cli.run import default_program

program = default_program()
