"""The v2 probe tools (tools/probe_single_passes.py, tools/probe_adapter_start.py): bad input is named in one line
with exit status 2, before any model loads."""

import probe_adapter_start
import probe_single_passes


def test_unknown_set_and_missing_loras_are_named(tmp_path, capsys):
    for tool, extra in ((probe_single_passes, []), (probe_adapter_start, ["--cells", "merge:1.0:0"])):
        assert tool.main(["--sets", "n3-zorbo-hattock-moon", *extra]) == 2
        assert "n3-zorbo-hattock-moon: no such set of size 3" in capsys.readouterr().err
        assert tool.main(["--sets", "n3-zorbo-hattock-chekka", "--adapters-dir", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err
        assert "no recipe LoRA for" in err and "zorbo" in err and "Traceback" not in err
