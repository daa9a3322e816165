"""What reaches the console: xgen's own lines and real errors; not orbax's absl chatter (kept in
run.log) nor XLA's constant-folding alarms on a CPU (xgen/xla_logs.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.conftest import CONF_DIR

REPO = Path(__file__).resolve().parents[1]


def xgen_run(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "xgen.run", *args], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_a_checkpoint_save_and_load_leaves_absl_lines_in_run_log_only(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    xgen_run("debug=fast", f"hydra.run.dir={first}")
    console = xgen_run("debug=fast", f"trainer.init_from={first}", f"hydra.run.dir={second}")  # loads, then saves
    assert "restored checkpoint" in console and "done: 6 steps" in console
    assert "[absl]" not in console
    log = (second / "run.log").read_text()
    assert "restored checkpoint" in log
    assert log.count("[absl][INFO]") >= 12  # orbax's lines of the load and the save
    assert "[absl][WARNING] - CheckpointManagerOptions.read_only=True" in log  # init_from opens it read-only


def test_absl_errors_still_reach_the_console(tmp_path):
    # Hydra's job logging from conf/config.yaml, as a job gets it (its file under tmp_path).
    code = textwrap.dedent(f"""
        import logging, logging.config
        from hydra import compose, initialize_config_dir
        from omegaconf import OmegaConf
        from xgen.config import register_configs
        register_configs()
        with initialize_config_dir(config_dir={str(CONF_DIR)!r}, version_base="1.3"):
            cfg = compose("config", return_hydra_config=True)
        conf = OmegaConf.to_container(cfg.hydra.job_logging, resolve=False)
        conf["handlers"]["file"]["filename"] = {str(tmp_path / "run.log")!r}
        logging.config.dictConfig(conf)
        absl = logging.getLogger("absl")
        absl.info("orbax info"); absl.warning("orbax warning"); absl.error("orbax error")
        try:
            raise ValueError("No space left on device")
        except ValueError:
            absl.exception("orbax thread failed\\nits second line")  # a background save's failure
        logging.getLogger("xgen.file_only").warning("exception ignored in finalizer")
        logging.getLogger("xgen.x").info("xgen info")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    assert "orbax error" in console and "xgen info" in console and "orbax thread failed" in console
    assert "orbax info" not in console and "orbax warning" not in console
    # An error's first line on the console; its other lines and traceback in run.log only.
    assert "its second line" not in console and "Traceback" not in console and "finalizer" not in console
    log = (tmp_path / "run.log").read_text()
    assert all(line in log for line in ("orbax info", "orbax warning", "orbax error", "xgen info", "its second line",
                                        "ValueError: No space left on device", "exception ignored in finalizer"))  # fmt: skip


# Constant folding a sort of a 30,000-element constant takes XLA seconds on a CPU: its alarm.
ALARM = """
import jax, jax.numpy as jnp, numpy as np
c = np.random.RandomState(0).rand(30_000).astype(np.float32)
jax.jit(lambda y: jnp.sort(jnp.asarray(c))[7] + y)(1.0).block_until_ready()
"""
# A real failure: out of memory, an exception from XLA.
FAILURE = "import jax.numpy as jnp\njnp.ones((1 << 44,), jnp.float32).block_until_ready()\n"
QUIET = "from xgen.xla_logs import quiet_cpu_compiler\nquiet_cpu_compiler('cpu', multi_process=False)\n"


def python(code: str) -> subprocess.CompletedProcess:
    # No compilation cache (tests/conftest.py sets one): a cached program is not compiled, so no alarm.
    drop = ("TF_CPP_MIN_LOG_LEVEL", "JAX_COMPILATION_CACHE_DIR", "JAX_COMPILATION_CACHE_MAX_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO, env={**env, "JAX_PLATFORMS": "cpu"}
    )


def test_xlas_constant_folding_alarm_is_quiet_on_a_cpu_and_real_errors_still_show():
    loud = python(ALARM)
    assert loud.returncode == 0 and "Constant folding an instruction is taking" in loud.stderr  # the trigger works
    quiet = python(QUIET + ALARM)
    assert quiet.returncode == 0 and "Constant folding" not in quiet.stderr
    failed = python(QUIET + FAILURE)
    assert failed.returncode != 0 and "RESOURCE_EXHAUSTED: Out of memory allocating" in failed.stderr


def test_accelerators_and_the_users_own_setting_keep_their_xla_log_level():
    code = "import os\nfrom xgen.xla_logs import quiet_cpu_compiler\n"
    code += "quiet_cpu_compiler({!r}, multi_process={})\nprint(os.environ.get('TF_CPP_MIN_LOG_LEVEL'))\n"
    assert python(code.format("tpu", False)).stdout.strip() == "None"
    assert python(code.format("cpu", True)).stdout.strip() == "None"
    assert python(code.format("cpu", False)).stdout.strip() == "3"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}
    mine = subprocess.run([sys.executable, "-c", code.format("cpu", False)], capture_output=True, text=True, timeout=60, env=env)
    assert mine.stdout.strip() == "0"


def test_a_heartbeat_logs_while_its_block_runs_and_nothing_for_a_short_block():
    import logging
    import threading

    from xgen.console import heartbeat

    lines, first = [], threading.Event()

    class Catch(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())
            first.set()

    logger = logging.getLogger("xgen.test_heartbeat")
    logger.addHandler(Catch())
    logger.setLevel(logging.INFO)
    with heartbeat("compiling the thing", every_s=60, logger=logger):
        pass
    assert lines == []
    with heartbeat("compiling the thing", every_s=0.01, logger=logger):
        assert first.wait(30)
    assert lines and all(line.startswith("compiling the thing: ") and line.endswith(" s ...") for line in lines)
