import os
import sys
from pathlib import Path

from lorakit.threads import configure_threads

# Before torch loads OpenMP: lorakit's defaults (passive waiting, one thread), whatever OMP_NUM_THREADS says, so the
# tests train the same bits everywhere; LORAKIT_TEST_THREADS=N to try another count.
THREADS = configure_threads(int(os.environ.get("LORAKIT_TEST_THREADS", "1")))

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# tools/*.py are scripts, not a package: tests that check a tool import it by name (`import bench_scale`).
sys.path.insert(0, str(ROOT / "tools"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(autouse=True)
def _session_threads():
    """Every test (and the fixtures set up after it) runs on the session's torch thread count, whatever a tool's
    ``main`` or a test set before: tiny models run as fast on one thread, several times faster when other jobs
    share the cores, and the count changes float reduction order, hence the bits of what a test trains."""
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def toy_loras(request):
    """``{concept: file}`` of every held-out toy concept LoRA (its recipe ``train_configs/toy_<concept>.yaml``) from
    the toy LoRA cache shared with ``lorakit demo`` and ``.ci/run`` (``lorakit.toyworld.loras.default_cache_dir``).
    Missing ones are trained first (about a minute each on one idle core), with a line per LoRA on the terminal
    so a first run does not sit silent."""
    import time

    from lorakit.toyworld.concepts import HELDOUT
    from lorakit.toyworld.loras import concept_lora_path, default_cache_dir, train_concept_lora

    cache = default_cache_dir()
    capture = request.config.pluginmanager.getplugin("capturemanager")
    names = [c.name for c in HELDOUT]
    missing = [n for n in names if not concept_lora_path(n, cache).exists()]

    def say(msg):
        with capture.global_and_fixture_disabled():
            print(msg, flush=True)

    if missing:
        say(f"\n[toy LoRAs] training {len(missing)} of {len(names)} into {cache} (cached for the next run; "
            f"`python tools/ci_artifacts.py --skip-hypernet --jobs 2` trains them two at a time)")
    files = {}
    for name in names:
        t0 = time.perf_counter()
        if name in missing:
            say(f"[toy LoRAs] {missing.index(name) + 1}/{len(missing)} {name} ...")
        files[name] = train_concept_lora(name, cache)
        if name in missing:
            say(f"[toy LoRAs] {name}: {files[name].name} in {time.perf_counter() - t0:.0f} s")
    return files


class _RegressionPoints(torch.utils.data.Dataset):
    """Ten 3-d points of a noiseless linear regression, y = x . (1, -2, 0.5) + 0.3 (seed 0)."""

    def __init__(self, n=10):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "y": self.y[i]}


@pytest.fixture
def regression_loop():
    """``run(out, overrides, make_model, loss_fn)``: lorakit's shared ``TrainLoop`` on ten regression points, with
    fresh accelerate state, ``TrainConfig`` = ``output_dir=out``, no logging, batch 3, cosine schedule, then
    ``overrides``; the model built by ``make_model()`` after ``torch.manual_seed(0)``; ``loss_fn(batch, step,
    model, cfg)``; the model's state dict saved as safetensors. Returns the loop's result."""
    from lorakit.config import load_config
    from lorakit.fileio import save_safetensors
    from lorakit.testing import reset_accelerate
    from lorakit.training.loop import TrainConfig, TrainLoop, build_optimizer, make_accelerator

    def run(out, overrides, make_model, loss_fn):
        reset_accelerate()
        cfg = load_config(TrainConfig, None, [f"output_dir={out}", "logging=none", "train_batch_size=3",
                                              "lr_scheduler=cosine", *overrides])
        acc = make_accelerator(cfg)
        torch.manual_seed(0)
        model = make_model()
        opt = build_optimizer(cfg, [{"params": model.parameters()}])
        return TrainLoop(cfg, acc, [model], opt, _RegressionPoints(), lambda batch, step, models: loss_fn(
            batch, step, models[0], cfg), lambda path: save_safetensors(model.state_dict(), path)).run()

    return run


@pytest.fixture(scope="session")
def sd1_pipe():
    from lorakit.models import tiny_pipeline

    return tiny_pipeline("sd1", seed=0)


@pytest.fixture(scope="session")
def sdxl_pipe():
    from lorakit.models import tiny_pipeline

    return tiny_pipeline("sdxl", seed=0)

# `pytest -m quick` (or `pytest --quick`, which also checks that every name below exists): a subset that touches
# every module cheaply, to run after each change (well under a minute on 2 cores): the layering and registry
# checks, configs, file formats, named user errors, and one tiny train / fuse / sample / eval smoke each. Whole
# files ("*") or the named tests (parametrized ones: every case) of each file. `-m "not slow"` is unchanged.
QUICK = {
    "test_adapter_formats.py": {"test_lycoris_loha_file", "test_unsupported_kind_and_unplaced_key_are_named",
                                "test_oft_and_boft_files_are_refused_by_kind"},
    "test_adapter_io.py": {"test_kohya_name_parsing", "test_peft_file_peft_roundtrip_exact",
                           "test_shape_mismatch_lists_offenders", "test_truncated_file_is_reported",
                           "test_atomic_write_leaves_no_partial_file"},
    "test_adapter_types.py": "*",
    "test_bench_scale.py": {"test_derived_rows", "test_plan_shares_one_process_per_size_for_the_base_preserving_stages"},
    "test_blocks.py": "*",
    "test_cli_output.py": {"test_every_option_has_help_and_its_default", "test_flags_are_taken_anywhere_and_last_wins"},
    "test_config_cli.py": "*",
    "test_convert.py": {"test_sdxl_key_styles_round_trip", "test_sai_for_sd1_is_refused"},
    "test_consumers.py": {"test_kohya_sdxl_network_has_sai_names_only"},
    "test_data.py": {"test_caption_files_and_metadata_jsonl", "test_items_are_a_function_of_the_sample_id",
                     "test_bad_and_missing_inputs_are_named"},
    "test_demo.py": {"test_prompt_is_the_training_caption_form", "test_bad_concept_fails_naming_it"},
    "test_edlora_adapter.py": {"test_new_tokens_are_two_per_cross_attention_layer",
                               "test_layer_variant_ids_replace_each_word"},
    "test_edlora_train.py": {"test_bad_inputs_are_named"},
    "test_eval_api.py": {"test_every_metric_has_settings_with_the_shared_fields",
                         "test_evaluation_needs_no_toy_world_and_the_toy_world_registers_its_oracle"},
    "test_eval_clipscore.py": {"test_negative_cosine_scores_zero"},
    "test_eval_retention.py": {"test_fused_equal_to_base_keeps_nothing"},
    "test_eval_bench_sets.py": {"test_sets_cover_every_combination",
                                "test_summary_counts_images_with_intervals_and_pairs_them"},
    "test_eval_judge.py": {"test_parsers", "test_pairwise_asks_both_orders_and_averages",
                           "test_toy_concepts_are_described_for_the_judge"},
    "test_eval_report.py": "*",
    "test_fuse_gradient.py": {"test_one_concept_gives_its_own_weights",
                              "test_nan_adapter_and_singular_system_are_clear_errors"},
    "test_fuse_merge.py": "*",
    "test_layout.py": "*",
    "test_lorarar.py": {"test_config_errors_name_the_key_and_file"},
    "test_measure_composition.py": "*",
    "test_measure_fusion_toy.py": "*",
    "test_memory.py": {"test_live_bytes_counts_peak_and_frees"},
    "test_models.py": {"test_detect_arch_rejects_other_unets", "test_tiny_is_seeded",
                       "test_load_base_errors_name_the_input"},
    "test_packaging.py": "*",
    "test_regional.py": {"test_inside_rounding_keeps_only_full_cells_center_keeps_centres",
                         "test_edges_on_cell_boundaries_keep_the_cell", "test_units_are_explicit",
                         "test_bad_yaml_file_is_one_line", "test_empty_box_warns"},
    "test_regional_conditions.py": {"test_weight_map_sets_boxes_later_entries_win",
                                    "test_cli_bad_regions_file_is_one_line_naming_file_and_entry_exit_2"},
    "test_registries.py": "*",
    "test_safety_checkpoints.py": {"test_planted_pickles_are_never_loaded", "test_bad_numbers_are_refused_before_anything",
                                   "test_checkpoint_error_is_a_value_error", "test_environment_secrets_never_reach_a_file"},
    "test_safety_inputs.py": {"test_latin1_caption_names_the_file", "test_yaml_syntax_error_is_one_line",
                              "test_missing_environment_variable_is_one_line", "test_error_boundary_kinds",
                              "test_bad_numbers_fail_before_any_model_loads", "test_fuse_weights_must_be_finite"},
    "test_safety_outputs.py": {"test_make_tiny_refuses_an_existing_file", "test_output_error_is_a_value_error",
                               "test_folders_are_swapped_atomically",
                               "test_stale_temp_files_of_a_killed_writer_are_cleaned"},
    "test_sampling.py": {"test_cmlora_plan_rotation_weights_and_refreshes", "test_switch_with_one_adapter_equals_merge",
                         "test_regions_file_validation"},
    "test_sampling_cli.py": {"test_cli_errors_are_named"},
    "test_single_file.py": {"test_added_tokens_are_refused"},
    "test_toy_sketch.py": {"test_silhouette_marks_the_drawn_shapes_one_per_half", "test_measure_helpers"},
    "test_toyworld.py": {"test_concept_sets_are_disjoint_and_complete", "test_render_is_deterministic_by_seed",
                         "test_captions_use_triggers_and_tags", "test_recipe_hash_covers_the_regularisation_images"},
    "test_toyworld_hardneg.py": {"test_wilson_and_paired_tests"},
    "test_toyworld_oracle.py": {"test_oracle_knows_every_concept", "test_score_contract_pil_and_tensor_agree"},
    "test_train_blockwise.py": {"test_configured_blocks_metadata_and_diffusers_load"},
    "test_train_entry.py": {"test_unknown_key_is_one_line_exit_2"},
    "test_train_loop.py": {"test_nan_loss_stops_with_step_and_checkpoint", "test_checkpointing_steps_zero_writes_no_checkpoint"},
    "test_ziplora.py": {"test_loss_at_coefficients_one_is_the_sum_of_both_loras"},
}


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true",
                     help="run only the quick subset (tests/conftest.py QUICK; same as -m quick, without importing "
                          "the other test files)")


def pytest_configure(config):
    if config.getoption("--quick"):
        config.option.markexpr = f"quick and ({config.option.markexpr})" if config.option.markexpr else "quick"


def pytest_ignore_collect(collection_path, config):
    if config.getoption("--quick") and collection_path.suffix == ".py" and collection_path.name.startswith("test_"):
        return collection_path.name not in QUICK or None
    return None


def _is_quick(item) -> bool:
    names = QUICK.get(item.path.name)
    return "slow" not in item.keywords and (names == "*" or (names is not None and item.originalname in names))


def _check_quick_names(items):
    """Under --quick (whole files collected): every test QUICK names exists, so a renamed test is not lost."""
    found = {(item.path.name, item.originalname) for item in items}
    files = {name for name, _ in found}
    missing = [f"{f}::{t}" for f, names in QUICK.items() if f in files and names != "*" for t in sorted(names)
               if (f, t) not in found]
    if missing:
        raise pytest.UsageError("tests/conftest.py QUICK names tests that do not exist: " + ", ".join(missing))


@pytest.hookimpl(tryfirst=True)  # mark before -m deselects
def pytest_collection_modifyitems(config, items):
    if config.getoption("--quick"):
        _check_quick_names(items)
    for item in items:
        if _is_quick(item):
            item.add_marker(pytest.mark.quick)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# Tests write only under their tmp_path; the exceptions are the toy LoRA and hypernetwork caches in artifacts/
# (by recipe hash, shared with `lorakit demo` and .ci/run, so a LoRA is trained once) and Python's own caches.
_MAY_APPEAR = ("artifacts", "__pycache__", ".pytest_cache")


def _new_paths() -> set[str] | None:
    """Untracked and ignored paths of the clone (``git status``), or None outside a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=normal"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    paths = {line[3:] for line in out.stdout.splitlines() if line[:2] in ("??", "!!")}
    return {p for p in paths if not any(part in _MAY_APPEAR for part in Path(p).parts)}


def pytest_sessionstart(session):
    session.config._paths_before = _new_paths()


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_paths_before", None)
    after = _new_paths() if before is not None else None
    if before is None or after is None or not after - before:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (f"tests wrote into the clone (not under tmp_path): {', '.join(sorted(after - before))} "
               "(tests/conftest.py _MAY_APPEAR lists the caches that may)")
    if reporter is not None:
        reporter.write_line("")
        reporter.write_line(message, red=True)
    else:
        print(message, file=sys.stderr)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED
