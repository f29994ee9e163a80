"""The one parser of model names: Hugging Face and OpenCLIP kinds (issue 13)."""

import json

import pytest

from vit_embedding_lens.loading import ModelSource, parse_model_name


def _folder(tmp_path, name, config):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_hf_names_and_folders(tmp_path, monkeypatch):
    hub = parse_model_name("hf:google/vit-base-patch16-224")
    assert hub == ModelSource("hf", "google/vit-base-patch16-224")
    assert hub.label == "hf:google/vit-base-patch16-224" and hub.tag is None

    hf = _folder(tmp_path, "my-vit", {"model_type": "vit", "hidden_size": 32})
    timm_folder = _folder(tmp_path, "timm-vit", {"architecture": "vit_tiny_patch16_224"})
    resolved = hf.resolve()
    for source in (
        parse_model_name(f"hf:{hf}"),
        parse_model_name(str(hf)),  # a folder path as the name
        parse_model_name(None, checkpoint=hf),  # --checkpoint DIR
        parse_model_name(f"local-dir:{hf}"),  # its config says Hugging Face
    ):
        assert source == ModelSource("hf-folder", str(resolved), resolved)
        assert source.label == f"hf:{resolved}"
    monkeypatch.chdir(tmp_path)
    assert parse_model_name("./my-vit").kind == "hf-folder"
    # a timm folder stays a timm folder, whichever way it is named
    for source in (
        parse_model_name(str(timm_folder)),
        parse_model_name(None, checkpoint=timm_folder),
    ):
        assert source.kind == "timm-folder" and source.path == timm_folder.resolve()


def test_open_clip_names():
    plain = parse_model_name("open_clip:ViT-B-16")
    assert plain == ModelSource("open_clip", "ViT-B-16")
    assert plain.architecture == "ViT-B-16" and plain.tag is None
    assert plain.label == "open_clip:ViT-B-16"
    tagged = parse_model_name("open_clip:ViT-B-16:laion2b_s34b_b88k")
    assert tagged.architecture == "ViT-B-16" and tagged.tag == "laion2b_s34b_b88k"
    hub = parse_model_name("open_clip:hf-hub:timm/ViT-B-16-SigLIP")
    assert hub.architecture == "hf-hub:timm/ViT-B-16-SigLIP" and hub.tag is None
    weights = parse_model_name("open_clip:ViT-B-32", checkpoint="w.pt")
    assert weights.kind == "open_clip" and str(weights.path) == "w.pt" and weights.tag is None
    assert parse_model_name("bundled:mnist-clip") == ModelSource("bundled", "mnist-clip")


@pytest.mark.parametrize(
    "name, checkpoint, match",
    [
        ("hf:", None, "names no Hugging Face model"),
        ("hf:google/vit", "w.pt", "carries its own weights"),
        ("hf:./missing-folder", None, "is not a folder"),
        ("open_clip:", None, "names no OpenCLIP model"),
        ("open_clip:ViT-B-16:", None, "names no OpenCLIP model"),
        ("open_clip:ViT-B-16:openai", "w.pt", "not both"),
        ("google/vit-base-patch16-224", None, "hf:NAME for a Hugging Face"),
    ],
)
def test_bad_hf_and_open_clip_names_are_clear(tmp_path, monkeypatch, name, checkpoint, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=match):
        parse_model_name(name, checkpoint)


def test_an_hf_folder_without_config_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        parse_model_name(f"hf:{tmp_path / 'empty'}")
