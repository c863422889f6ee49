"""tools/train_caption_variant_lora.py: the recipe's own renders, captions without the class word."""

import pytest

import train_caption_variant_lora as tool


@pytest.mark.parametrize("identity, phrase", [("inkvel", "inkvel outline style"), ("kwibbit", "kwibbit frog"),
                                              ("chekka", "chekka checker background")])
def test_the_phrase_is_how_the_recipe_captions_name_the_identity(identity, phrase):
    assert tool.identity_phrase(identity) == phrase


@pytest.mark.parametrize("captions, expected", [("trigger-kind", "red circle, white plain background, inkvel style"),
                                                ("trigger", "red circle, white plain background, inkvel")])
def test_recaption_leaves_out_the_class_word(captions, expected):
    text = "red circle, white plain background, inkvel outline style"
    assert tool.recaption(text, "inkvel", captions) == expected


def test_a_character_has_no_kind_word_so_both_forms_are_its_trigger():
    assert tool.recaption("kwibbit frog, night background", "kwibbit", "trigger-kind") == "kwibbit, night background"


def test_a_caption_without_the_identity_is_an_error():
    with pytest.raises(ValueError, match="does not name 'inkvel'"):
        tool.recaption("red circle, outline style", "inkvel", "trigger")


def test_the_variant_is_the_recipes_images_with_only_the_phrase_changed(tmp_path):
    from lorakit.toyworld.v2.dataset import make_dataset

    make_dataset("inkvel", tmp_path / "recipe", 40, 0)
    tool.write_variant("inkvel", "trigger", tmp_path / "variant")
    for png in sorted((tmp_path / "recipe").glob("*.png")):
        other = tmp_path / "variant" / png.name
        assert other.read_bytes() == png.read_bytes()
        text = png.with_suffix(".txt").read_text()
        assert other.with_suffix(".txt").read_text() == text.replace("inkvel outline style", "inkvel")
        assert "outline" not in other.with_suffix(".txt").read_text()


def test_reg_folder_is_both_sets_renumbered(tmp_path):
    from lorakit.toyworld.v2.dataset import make_dataset

    make_dataset("class", tmp_path / "a", 3, 1)
    make_dataset("class", tmp_path / "b", 2, 2)
    tool.write_reg(tmp_path / "a", tmp_path / "b", tmp_path / "reg")
    names = sorted(p.name for p in (tmp_path / "reg").iterdir())
    assert names == [f"{i:05d}.{e}" for i in range(5) for e in ("png", "txt")]
    assert (tmp_path / "reg" / "00003.txt").read_text() == (tmp_path / "b" / "00000.txt").read_text()


@pytest.mark.parametrize("argv, words", [(["frog", "--captions", "trigger"], "identities"),
                                         (["inkvel", "--captions", "trigger", "--reg-prior", "/nonexistent"],
                                          "--reg-prior")])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, words):
    assert tool.main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
