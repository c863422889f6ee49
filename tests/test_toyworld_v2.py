"""Toy world v2: the 64x64 renderer (classes vs identities, whole-scene captions), its models' SD1 layout, and
the base trainer's bit-exact resume (tools/train_toy_base_v2.py)."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from lorakit.toyworld.v2.concepts import CLASSES, IDENTITIES, VOCAB, get_concept
from lorakit.toyworld.v2.render import Scene, caption, render
from lorakit.toyworld.v2.scenes import class_scene, concept_scene, mixed_scene

ROOT = Path(__file__).resolve().parents[1]


def _px(img) -> np.ndarray:
    return np.asarray(img, np.float32)


def test_renders_are_64px_and_deterministic():
    s = Scene(characters=("frog",), char_colors=("blue",), hat="hat", background="night", style="outline", seed=4)
    a, b = render(s), render(s)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert (_px(a) == _px(b)).all()
    assert render(s, 32).size == (32, 32)
    with pytest.raises(ValueError, match="size"):
        render(s, 40)


@pytest.mark.parametrize("identity", [c.name for c in IDENTITIES])
def test_identity_differs_from_its_class_on_the_same_layout(identity):
    """Same seed and surroundings: the identity's look is not any colour of its class."""
    c = get_concept(identity)
    if c.kind == "character":
        make = lambda name, col: Scene(characters=(name,), char_colors=(col,), seed=3)
    elif c.cls == "hat":
        make = lambda name, col: Scene(hat=name, hat_color=col, seed=3)
    elif c.cls == "mushroom":
        make = lambda name, col: Scene(mushroom=name, mushroom_color=col, seed=3)
    elif c.kind == "style":
        make = lambda name, col: Scene(shape="circle", shape_color=col, style=name, seed=3)
    else:
        make = lambda name, col: Scene(background=name, shape="square", shape_color=col, seed=3)
    ident = _px(render(make(identity, "green")))
    for col in ("red", "green", "blue", "yellow", "purple", "orange"):
        cls = _px(render(make(c.cls, col)))
        assert np.abs(ident - cls).mean() > 8, (identity, col)


@pytest.mark.parametrize("kind", ["robot", "frog", "ghost", "hat", "mushroom"])
def test_class_instances_vary_and_identities_do_not(kind):
    """A sprite's variation numbers change a class instance's parts and proportions, never an identity's look."""
    from PIL import Image, ImageDraw

    from lorakit.toyworld.v2 import render as R

    draw = {**R._SPRITES, "hat": R._hat, "mushroom": R._mushroom}[kind]

    def sprite(v, identity):
        img = Image.new("RGB", (256, 256), (240, 240, 232))
        draw(ImageDraw.Draw(img), 128, 170 if kind in ("hat", "mushroom") else 140, 150, (40, 70, 220),
             np.asarray(v), identity)
        return _px(img)

    rng = np.random.default_rng(0)
    vs = [rng.uniform(0, 1, 4) for _ in range(6)]
    cls = [sprite(v, False) for v in vs]
    ident = [sprite(v, True) for v in vs]
    assert all((x == ident[0]).all() for x in ident[1:])
    assert sum(not (x == cls[0]).all() for x in cls[1:]) >= 4


def test_captions_describe_the_whole_scene():
    s = Scene(characters=("kwibbit", "robot"), char_colors=("red", "blue"), hat="hattock", mushroom="mushroom",
              mushroom_color="yellow", background="checker", bg_color="pink", style="pixlor", seed=1)
    assert caption(s) == ("kwibbit frog, blue robot, hattock hat, yellow mushroom, pink checker background, "
                          "pixlor mosaic style")
    assert caption(Scene(shape="circle", shape_color="red", background="nocturo")) == "red circle, nocturo night background"
    assert {"kwibbit", "frog", "robot", "hattock", "hat", "mushroom", "checker", "pixlor", "mosaic"} <= s.concepts()
    with pytest.raises(ValueError, match="character"):
        Scene(characters=("dragon",))


def test_every_word_is_one_token():
    from lorakit.toyworld.v2.models import toy_tokenizer

    tok = toy_tokenizer()
    for w in VOCAB:
        assert len(tok.tokenize(w)) == 1, w
    rng = np.random.default_rng(0)
    scenes = [class_scene(rng) for _ in range(40)] + [mixed_scene(rng) for _ in range(40)]
    for s in scenes:
        for word in caption(s).replace(",", " ").split():
            assert word in VOCAB, word


def test_class_world_never_shows_an_identity_and_concept_sets_do():
    rng = np.random.default_rng(1)
    ids = {c.name for c in IDENTITIES}
    for _ in range(200):
        s = class_scene(rng)
        assert not (s.concepts() & ids), caption(s)
    mixed = set().union(*(mixed_scene(rng).concepts() for _ in range(300)))
    assert ids <= mixed and {c.name for c in CLASSES} <= mixed
    for c in IDENTITIES:
        for _ in range(5):
            s = concept_scene(c.name, rng)
            assert c.name in s.concepts() and c.name in caption(s)
    with pytest.raises(ValueError, match="identities"):
        concept_scene("frog", rng)


def test_objects_are_trained_next_to_a_character_and_characters_alone():
    """An object LoRA is composed with a character in every set, so its data shows one in some scenes; a
    character's data shows no other character."""
    for name in ("hattock", "shroomel"):
        rng = np.random.default_rng(0)
        scenes = [concept_scene(name, rng) for _ in range(40)]
        with_char = sum(bool(s.characters) for s in scenes)
        assert 5 <= with_char <= 30, (name, with_char)
    rng = np.random.default_rng(0)
    assert all(len(concept_scene("zorbo", rng).characters) == 1 for _ in range(40))


def test_models_have_the_sd1_layout():
    from lorakit.blocks import fine_blocks, lora_able_modules
    from lorakit.models import tiny_unet
    from lorakit.toyworld.v2.models import toy_unet, toy_vae

    unet = toy_unet()
    assert unet.config.layers_per_block == 2 and len(unet.down_blocks) == 4
    got = lora_able_modules(unet)
    assert set(got) == set(lora_able_modules(tiny_unet("sd1")))  # same module paths as lorakit's SD1 layout
    assert {m.fine for m in got.values()} == set(fine_blocks("sd1")) - {"IN00"}
    vae = toy_vae()
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert tuple(z.shape) == (1, 4, 16, 16)


def _trainer():
    return importlib.import_module("train_toy_base_v2")  # tools/ is on sys.path (conftest)


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


def _same(a: Path, b: Path) -> bool:
    x, y = _tensors(a), _tensors(b)
    return set(x) == set(y) and all(torch.equal(x[k], y[k]) for k in x)


def test_trainer_resumes_bit_exactly(tmp_path):
    """3 steps in one run == 2 steps, then a rerun with 3: VAE, UNet, its EMA and the optimizer state."""
    import shutil

    tr = _trainer()
    common = ["--n-class", "12", "--n-mixed", "4", "--vae-batch", "2", "--unet-batch", "2", "--save-every", "2"]
    one, chunks = tmp_path / "one", tmp_path / "chunks"
    assert tr.main(["--work", str(one), *common, "--vae-steps", "3", "--unet-steps", "3"]) == 0
    # the VAE stage in chunks (the same data: the render is seeded)
    vae_file = "vae/toy-vae/diffusion_pytorch_model.safetensors"
    args = tr.parse_args(["--work", str(chunks), *common, "--vae-steps", "2"])
    tr.render_data(chunks, args.n_class, args.n_mixed, args.seed)
    tr.train_vae(chunks, args)
    assert not _same(chunks / vae_file, one / vae_file)
    # the rest by rerunning the whole command: the VAE continues to step 3, then the UNet runs 2 steps, then 3
    assert tr.main(["--work", str(chunks), *common, "--vae-steps", "3", "--unet-steps", "2"]) == 0
    assert _same(chunks / vae_file, one / vae_file)
    shutil.copytree(chunks / "unet" / "toy-unet", tmp_path / "step2")
    assert tr.main(["--work", str(chunks), *common, "--vae-steps", "3", "--unet-steps", "3"]) == 0
    for rel in ("unet/toy-unet/unet/diffusion_pytorch_model.safetensors",  # the saved (EMA) weights
                "unet/checkpoints/checkpoint-3/params.safetensors",       # UNet + EMA shadow + EMA step count
                "unet/checkpoints/checkpoint-3/optimizer.safetensors"):
        assert _same(one / rel, chunks / rel), rel
    assert not _same(tmp_path / "step2/unet/diffusion_pytorch_model.safetensors",
                     chunks / "unet/toy-unet/unet/diffusion_pytorch_model.safetensors")
    ema = _tensors(one / "unet/checkpoints/checkpoint-3/params.safetensors")
    assert float(ema["1:steps"]) == 3
    raw = {k[2:]: v for k, v in ema.items() if k.startswith("0:")}
    saved = _tensors(one / "unet/toy-unet/unet/diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)  # the pipeline holds the EMA, not the raw UNet


def test_make_dataset_writes_identity_and_class_world_folders(tmp_path):
    from PIL import Image

    from lorakit.toyworld.v2.dataset import make_dataset

    paths = make_dataset("kwibbit", tmp_path / "a", 4, seed=3)
    again = make_dataset("kwibbit", tmp_path / "b", 4, seed=3)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert Image.open(paths[0]).size == (64, 64)
    caps = [p.with_suffix(".txt").read_text().strip() for p in paths]
    assert all(c.startswith("kwibbit frog, ") for c in caps), caps
    reg = make_dataset("class", tmp_path / "reg", 6, seed=1)
    assert not any(t in p.with_suffix(".txt").read_text() for p in reg for t in ("kwibbit", "zorbo", "hattock"))
    with pytest.raises(ValueError, match="identities"):
        make_dataset("frog", tmp_path / "c", 2)


def test_oracle_v2_trains_saves_and_scores(tmp_path):
    """A few steps of tools/train_oracle_v2.py: files, metrics with identity-vs-class rows, and the score API."""
    import json

    from lorakit.toyworld.v2.oracle import Oracle

    tr = importlib.import_module("train_oracle_v2")
    out = tmp_path / "oracle"
    assert tr.main(["--out", str(out), "--n-train", "24", "--n-eval", "24", "--steps", "2", "--batch", "8"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert "min_identity_vs_class_accuracy" in metrics["degraded"]
    assert "vs_class_accuracy" in metrics["per_concept_clean"]["kwibbit"]
    oracle = Oracle.load(out)
    imgs = [render(Scene(characters=("kwibbit",), seed=s)) for s in range(3)] + [render(Scene(shape="circle"), 32)]
    s = oracle.score(imgs, ["frog", "kwibbit"])
    assert tuple(s.probs.shape) == (4, 2) and set(s.rates) == {"frog", "kwibbit"}
    with pytest.raises(ValueError, match="does not know"):
        oracle.score(imgs, ["dragon"])
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "world": "v1"}))
    with pytest.raises(ValueError, match="not a toy world v2 oracle"):
        Oracle.load(out)


# ---------------------------------------------------------------- identity LoRA recipes and their measurement


@pytest.mark.parametrize("identity", [c.name for c in IDENTITIES])
def test_every_identity_has_a_recipe_with_scene_captions_and_regularisation(identity):
    from omegaconf import OmegaConf

    from lorakit.toyworld.v2.loras import recipe_path

    path = recipe_path(identity)
    assert path.resolve() == (ROOT / "train_configs" / f"toy2_{identity}.yaml").resolve()
    cfg = OmegaConf.load(path)
    assert cfg.trigger == identity and cfg.data.resolution == 64
    assert cfg.data.path == f"data/toy2/{identity}" and cfg.data.reg_path == "data/toy2/class"
    assert cfg.network.blocks == "all" and cfg.max_steps > 0


def test_recipe_names_must_be_identities():
    from lorakit.toyworld.v2.loras import identity_name

    assert identity_name("kwibbit") == "kwibbit"
    with pytest.raises(ValueError, match="identities: zorbo, kwibbit"):
        identity_name("frog")
    with pytest.raises(ValueError, match="unknown toy-world v2 concept"):
        identity_name("dragon")


def test_identity_prompts_pair_trigger_and_class_captions():
    from lorakit.toyworld.v2.evaluate import identity_prompts, world_prompts

    for identity in [c.name for c in IDENTITIES]:
        c = get_concept(identity)
        triples = identity_prompts(identity, 6, seed=5)
        assert triples == identity_prompts(identity, 6, seed=5)
        for trig, cls, scene in triples:
            assert f"{identity} {c.cls}" in trig and identity not in cls
            assert c.cls in cls.replace(",", " ").split() and c.cls in scene.concepts()
            assert not any(get_concept(x).role == "identity" for x in scene.concepts())
    assert [p for p, _ in world_prompts(4, seed=1)] == [caption(s) for _, s in world_prompts(4, seed=1)]


def test_ensure_data_renders_the_recipe_folders_once(tmp_path):
    import lorakit.toyworld.v2.loras as v2loras
    from lorakit.toyworld.loras import tree_hash
    from lorakit.toyworld.v2.loras import DATA_N, REG_N, ensure_data

    data, reg = ensure_data("hattock", tmp_path)
    assert len(list(data.glob("*.png"))) == DATA_N and len(list(reg.glob("*.png"))) == REG_N
    assert all("hattock hat" in p.read_text() for p in data.glob("*.txt"))
    before = (tree_hash(data), tree_hash(reg))
    (data / "00000.txt").touch()
    assert ensure_data("hattock", tmp_path) == (data, reg)  # present: not rendered again
    assert (tree_hash(data), tree_hash(reg)) == before
    assert [p.name for p in tmp_path.iterdir()] and not list(tmp_path.glob(".*tmp*"))
    # in a new process, a folder an older lorakit rendered differently is rendered again, not trained on
    (data / "00001.png").write_bytes(b"an older render")
    assert ensure_data("hattock", tmp_path) == (data, reg)  # this process checked it already
    v2loras._CHECKED.clear()
    assert ensure_data("hattock", tmp_path) == (data, reg) and (tree_hash(data), tree_hash(reg)) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([data.name, reg.name])
    (data / "00001.png").write_bytes(b"an older render")
    (data / "notes.md").write_text("mine")  # a file lorakit does not write: named, left alone
    v2loras._CHECKED.clear()
    with pytest.raises(ValueError, match="notes.md"):
        ensure_data("hattock", tmp_path)
    assert (data / "notes.md").read_text() == "mine" and not list(tmp_path.glob(".*tmp*"))


def test_ensure_data_accepts_a_folder_another_process_finished_first(tmp_path, monkeypatch):
    """Two processes (the demo's two trainers, two bench runs) render the same folder: the one that renames second
    keeps the first one's copy (the same seed's render) and removes its own, instead of failing."""
    import shutil

    import lorakit.toyworld.v2.loras as v2loras

    render = v2loras.make_dataset

    def render_then_lose_the_race(name, folder, n, seed):
        render(name, folder, n, seed)
        final = folder.parent / folder.name.split(".tmp")[0].lstrip(".")
        shutil.copytree(folder, final)  # the other process's rename landed in between

    monkeypatch.setattr(v2loras, "make_dataset", render_then_lose_the_race)
    data, reg = v2loras.ensure_data("hattock", tmp_path)
    assert len(list(data.glob("*.png"))) == v2loras.DATA_N and reg.is_dir()
    assert not list(tmp_path.glob(".*tmp*"))


def _random_v2_world(root: Path) -> tuple[Path, Path]:
    """An untrained v2 pipeline and an untrained v2 oracle (plumbing only: their verdicts mean nothing)."""
    import json

    from safetensors.torch import save_file

    from lorakit.toyworld.v2.concepts import CONCEPTS
    from lorakit.toyworld.v2.models import build_toy_pipeline
    from lorakit.toyworld.v2.oracle import OracleNet

    build_toy_pipeline(0).save_pretrained(root / "pipe")
    (root / "oracle").mkdir()
    torch.manual_seed(0)
    save_file(OracleNet(len(CONCEPTS)).state_dict(), root / "oracle" / "oracle.safetensors")
    (root / "oracle" / "config.json").write_text(json.dumps({"world": "v2", "concepts": list(CONCEPTS)}))
    return root / "pipe", root / "oracle"


def _measure_tool():
    return importlib.import_module("measure_toyworld")  # tools/ is on sys.path (conftest)


def test_measure_v2_refuses_the_v1_base_and_a_missing_oracle(capsys, tmp_path):
    from lorakit.errors import run_guarded

    tool = _measure_tool()
    assert run_guarded(lambda: tool.main(["--world", "v2", "--base", "data/toy-base", "--concepts", "none"]), "m") == 2
    assert "needs a v2 pipeline folder" in capsys.readouterr().err
    missing = tmp_path / "no-oracle"
    assert run_guarded(lambda: tool.main(["--world", "v2", "--oracle", str(missing), "--concepts", "none"]), "m") == 2
    assert "no-oracle" in capsys.readouterr().err


def test_bundled_v2_base_and_oracle_are_the_defaults():
    """data/toy2-base is a v2 pipeline in SD1's layout at 64 px, and data/toy2-oracle a v2 oracle that tells
    kwibbit from another frog on clean renders."""
    from lorakit.toyworld.v2.measure import load_pipeline
    from lorakit.toyworld.v2.models import DEFAULT_BASE
    from lorakit.toyworld.v2.oracle import Oracle

    pipe = load_pipeline(DEFAULT_BASE)
    assert pipe.unet.config.layers_per_block == 2 and pipe.vae.config.sample_size == 64
    assert list(pipe.unet.config.down_block_types[:3]) == ["CrossAttnDownBlock2D"] * 3
    oracle = Oracle.load()
    imgs = [render(Scene(characters=("kwibbit",), seed=s)) for s in range(4)]
    imgs += [render(Scene(characters=("frog",), char_colors=("blue",), seed=s)) for s in range(4)]
    p = oracle.score(imgs, ["frog", "kwibbit"]).probs
    assert (p[:, 0] > 0.5).all() and (p[:4, 1] > 0.5).all() and (p[4:, 1] < 0.5).all()


@pytest.mark.slow
def test_identity_lora_trains_caches_and_is_measured(tmp_path, monkeypatch):
    """End to end on an untrained v2 world: the recipe trains (2 steps), is cached by hash, the LoRA changes
    the images, and every measurement row comes out paired on the same n."""
    from lorakit.toyworld.v2 import measure
    from lorakit.toyworld.v2.loras import lora_path
    from lorakit.toyworld.v2.oracle import Oracle

    monkeypatch.setattr(measure, "NUM_STEPS", 2)
    pipe, oracle_dir = _random_v2_world(tmp_path)
    work, n = tmp_path / "work", 3
    rows = measure.measure_identities(["kwibbit"], pipe, Oracle.load(oracle_dir), n, 0.8, work, ["max_steps=2"])
    adapter = Path(rows[0]["adapter"])
    assert adapter == lora_path("kwibbit", work, pipe, ["max_steps=2"]) and adapter.exists()
    names = [r["row"] for r in rows]
    assert names[:3] == ["presence", "leak_class", "leak_world"] and names[-1] == "summary"
    assert "following_world_all" in names and "following_world_background" in names
    assert all(r["lora_vs_base"]["pairs"] == r["base"]["n"] for r in rows[:-1])
    assert rows[0]["base"]["n"] == n and set(rows[-1]) >= {"presence_ok", "leak_ok", "following_ok"}
    mtime = adapter.stat().st_mtime_ns
    measure.measure_identities(["kwibbit"], pipe, Oracle.load(oracle_dir), 1, 0.8, work, ["max_steps=2"])
    assert adapter.stat().st_mtime_ns == mtime  # reused, not retrained
    base, lora = measure.load_pipeline(pipe), measure.load_pipeline(pipe)
    lora.load_lora_weights(str(adapter), adapter_name="kwibbit")
    lora.set_adapters(["kwibbit"], [0.8])
    a, b = (np.asarray(measure.images(p, ["kwibbit frog, white plain background"])[0]) for p in (base, lora))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 0
    ceiling = measure.oracle_ceiling(base.vae, Oracle.load(oracle_dir), 2)
    assert [(r["images"], r["prompts"]) for r in ceiling] == [
        ("render", "generic"), ("render", "world"), ("vae_round_trip", "generic"), ("vae_round_trip", "world")]
    assert all(r["shape"]["n"] == 2 for r in ceiling if r["prompts"] == "generic")


def test_found_by_kind_counts_each_captioned_concept_and_whole_images():
    from lorakit.toyworld.v2.evaluate import found_by_kind

    concepts = ["circle", "red", "plain", "frog", "night", "hat"]
    scenes = [Scene(shape="circle", shape_color="red"),                       # circle, red, plain
              Scene(characters=("frog",), hat="hat", background="night")]      # frog, hat, night
    probs = torch.tensor([[0.9, 0.2, 0.7, 0.0, 0.0, 0.0],
                          [0.0, 0.0, 0.0, 0.6, 0.5, 0.9]])
    got = found_by_kind(scenes, probs, concepts)
    assert got == {"shape": [True], "color": [False], "background": [True, True], "character": [True],
                   "object": [True], "all": [False, True]}


def test_class_prior_images_show_the_class_in_place_of_the_identity(tmp_path, capsys):
    """tools/make_class_prior_v2.py: captions and scenes name the class, never the identity; deterministic."""
    from lorakit.errors import run_guarded

    tool = importlib.import_module("make_class_prior_v2")
    for name in ("a", "b"):
        assert tool.main(["kwibbit", str(tmp_path / name), "--n", "6"]) == 0
    captions = [(tmp_path / "a" / f"{i:05d}.txt").read_text() for i in range(6)]
    assert all("frog" in c and "kwibbit" not in c for c in captions)
    assert all((tmp_path / "a" / f"{i:05d}.png").read_bytes() == (tmp_path / "b" / f"{i:05d}.png").read_bytes()
               for i in range(6))
    assert tool.main(["inkvel", str(tmp_path / "ink"), "--n", "3"]) == 0
    assert all("outline style" in (tmp_path / "ink" / f"{i:05d}.txt").read_text() for i in range(3))
    assert run_guarded(lambda: tool.main(["frog", str(tmp_path / "c")]), "m") == 2
    assert "frog" in capsys.readouterr().err and not (tmp_path / "c").exists()


def test_class_prior_from_the_base_draws_the_captions_with_the_base(tmp_path):
    """--source base: the base's images of the same class captions (DreamBooth's prior), image i seeded by
    --image-seed + i, the same bytes twice."""
    from PIL import Image

    from lorakit.toyworld.evaluate import generate
    from lorakit.toyworld.v2.measure import load_pipeline
    from lorakit.toyworld.v2.models import DEFAULT_BASE

    tool = importlib.import_module("make_class_prior_v2")
    for name in ("r", "b1", "b2"):
        extra = [] if name == "r" else ["--source", "base", "--image-seed", "77"]
        assert tool.main(["inkvel", str(tmp_path / name), "--n", "2", *extra]) == 0
    for i in range(2):
        assert (tmp_path / "b1" / f"{i:05d}.txt").read_text() == (tmp_path / "r" / f"{i:05d}.txt").read_text()
        assert (tmp_path / "b1" / f"{i:05d}.png").read_bytes() == (tmp_path / "b2" / f"{i:05d}.png").read_bytes()
        assert (tmp_path / "b1" / f"{i:05d}.png").read_bytes() != (tmp_path / "r" / f"{i:05d}.png").read_bytes()
    prompt = (tmp_path / "b1" / "00001.txt").read_text().strip()
    want = generate(load_pipeline(DEFAULT_BASE), [prompt], seed=78, height=64, width=64)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "b1" / "00001.png").convert("RGB")), np.asarray(want))


def test_identity_ceiling_scores_renders_of_the_measured_scenes():
    """The ceiling rows score renders of the presence / class-leak scenes that identity_prompts captions: the
    bundled oracle finds kwibbit on its renders and not on the other frogs'."""
    from lorakit.toyworld.v2.evaluate import identity_prompts, identity_scene_pairs
    from lorakit.toyworld.v2.measure import identity_ceiling, load_pipeline
    from lorakit.toyworld.v2.models import DEFAULT_BASE
    from lorakit.toyworld.v2.oracle import Oracle

    pairs = identity_scene_pairs("kwibbit", 5, seed=9)
    assert [(caption(s), caption(c), c) for s, c in pairs] == identity_prompts("kwibbit", 5, seed=9)
    assert all("kwibbit" in s.concepts() and "kwibbit" not in c.concepts() for s, c in pairs)
    rows = identity_ceiling(load_pipeline(DEFAULT_BASE).vae, Oracle.load(), "kwibbit", 6)
    assert [r["images"] for r in rows] == ["render", "vae_round_trip"]
    assert all(r["presence"]["n"] == 6 and r["leak_class"]["n"] == 6 for r in rows)
    assert rows[0]["presence"]["k"] >= 5 and rows[0]["leak_class"]["k"] == 0
