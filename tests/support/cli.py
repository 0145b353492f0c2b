"""Running `mlxvid` in the tests: a generate command line, and a run that must fail with a clean error."""

from __future__ import annotations

import pytest

from mlx_video.cli import main


def gen(model, *extra) -> list[str]:
    """`mlxvid generate` on `model` with a short prompt, quiet, plus `extra`."""
    return ["generate", "--model", str(model), "--prompt", "a cat", "--quiet", *extra]


def run_error(capsys, args) -> str:
    """Run `mlxvid args`, which must exit with status 1 and one `error: ...` message (no traceback); returns it."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err
