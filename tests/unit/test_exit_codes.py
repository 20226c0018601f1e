"""cli.args.one_line_errors: the one mapping of the errors a command ends with to one line and an exit code."""

import pytest

from dcgan_dist.cli.args import one_line_errors
from dcgan_dist.config import ConfigError
from dcgan_dist.errors import RunError
from dcgan_dist.storage.filesystem import StoreError
from dcgan_dist.training.checkpoint import CheckpointError, CheckpointWriteError


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ConfigError("bad setting"), 2),
        (StoreError("no bucket"), 2),
        (CheckpointError("not a checkpoint"), 2),
        (CheckpointWriteError("disk full"), 1),  # a CheckpointError, but during the run
        (RunError("the store stopped answering"), 1),
    ],
)
def test_each_error_is_one_line_and_its_exit_code(error, code, capsys):
    @one_line_errors
    def main(argv=None) -> int:
        raise error

    assert main([]) == code
    assert capsys.readouterr().err == f"error: {error}\n"


def test_other_exceptions_and_exit_codes_pass_through():
    @one_line_errors
    def main(argv=None) -> int:
        if argv:
            raise KeyError(argv[0])  # a bug: its traceback is shown
        return 3

    assert main([]) == 3
    with pytest.raises(KeyError):
        main(["x"])
