"""`for_inference`: the served form of a model computes what the checkpoint's model computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models import ARCHITECTURES, Classifier, FashionCNN, Network, for_inference
from models.networks import model_args_for


def _trained_looking(model: nn.Module) -> nn.Module:
    """Random weights and non-trivial BatchNorm statistics, as after training."""
    torch.manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def test_the_cnn_is_folded_and_channels_last_and_computes_the_same() -> None:
    model = _trained_looking(FashionCNN())
    keys = list(model.state_dict())
    served = for_inference(model, ARCHITECTURES["cnn"])
    x = torch.randn(8, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(served(x), model(x), atol=1e-4)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in served.modules())
    convs = [m for m in served.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    assert not served.training
    # The checkpoint's model is untouched: /model still describes it.
    assert list(model.state_dict()) == keys
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4


def test_a_three_stage_cnn_is_folded_too_and_the_two_stage_layout_is_unchanged() -> None:
    """A third stage appends modules: the bundled two-stage checkpoints keep their state_dict keys."""
    two = FashionCNN((4, 8), hidden=8)
    assert [k for k in two.state_dict() if k.endswith("weight")] == [
        "features.0.0.weight", "features.0.1.weight", "features.1.0.weight", "features.1.1.weight",
        "features.3.0.weight", "features.3.1.weight", "features.4.0.weight", "features.4.1.weight",
        "head.2.weight", "head.5.weight",
    ]  # fmt: skip
    assert two.head[2].in_features == 8 * 7 * 7
    three = _trained_looking(FashionCNN((4, 8, 16), hidden=8))
    assert three.head[2].in_features == 16 * 3 * 3  # 28 -> 14 -> 7 -> 3
    served = for_inference(three, ARCHITECTURES["cnn"])
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(served(x), three(x), atol=1e-4)
    assert sum(isinstance(m, nn.Conv2d) for m in served.modules()) == 6
    assert not any(isinstance(m, nn.BatchNorm2d) for m in served.modules())


def test_the_cnn_takes_two_or_three_stages() -> None:
    assert model_args_for("cnn", {"channels": [4, 8, 16]})["channels"] == [4, 8, 16]
    for channels in ([4], [4, 8, 16, 32]):
        with pytest.raises(ValueError, match="channels must be a list of 2 to 3 integers"):
            model_args_for("cnn", {"channels": channels})


def test_a_cnn_stage_can_have_one_to_three_convolutions_and_is_folded_alike() -> None:
    shallow = _trained_looking(FashionCNN((4, 8, 16), hidden=8, depths=(1, 2, 3)))
    convs = [m for m in shallow.features.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(1, 4), (4, 8), (8, 8), (8, 16), (16, 16), (16, 16)]
    assert shallow.head[2].in_features == 16 * 3 * 3
    served = for_inference(shallow, ARCHITECTURES["cnn"])
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(served(x), shallow(x), atol=1e-4)
    assert model_args_for("cnn", {})["depths"] is None  # two per stage, as every bundled CNN has
    for depths, message in (([1, 2], "depths must be a list of 3 to 3"), ([1, 2, 4], "1 to 3 convolutions")):
        with pytest.raises(ValueError, match=message):
            model_args_for("cnn", {"channels": [4, 8, 16], "depths": depths})


def _plain_and_mirrored(mirror_below: float | None = None) -> tuple[FashionCNN, FashionCNN]:
    """A small CNN and the same weights mirrored (`mirror_below` as given)."""
    torch.manual_seed(1)
    plain = _trained_looking(FashionCNN((4, 8, 16), hidden=8))
    mirrored = FashionCNN((4, 8, 16), hidden=8, mirror=True, mirror_below=mirror_below).eval()
    mirrored.load_state_dict(plain.state_dict())
    return plain, mirrored


def test_a_mirrored_cnn_answers_with_the_mean_of_an_image_and_its_mirror() -> None:
    """Its logits (and the penultimate features the OOD score reads) are the means of the plain
    model's on the image and on the image flipped left to right; folding keeps that."""
    plain, mirrored = _plain_and_mirrored()
    x = torch.randn(5, 1, 28, 28)
    with torch.inference_mode():
        logits = [plain.head(plain.features(v)) for v in (x, x.flip(-1))]
        expected = torch.log_softmax((logits[0] + logits[1]) / 2, dim=1)
        assert torch.allclose(mirrored(x), expected, atol=1e-5)
        assert not torch.allclose(mirrored(x), plain(x), atol=1e-6), "the mirror changes the answer"
        served = for_inference(mirrored, ARCHITECTURES["cnn"])
        assert torch.allclose(served(x), expected, atol=1e-4)
    with pytest.raises(ValueError, match="mirror must be true or false"):
        model_args_for("cnn", {"mirror": 1})


def test_a_cnn_mirrored_below_a_probability_answers_again_only_the_images_in_doubt() -> None:
    """With `mirror_below`, an image whose plain top probability is below it gets the mirrored
    answer, every other image the plain one, in the same batch; folding keeps that."""
    plain, always = _plain_and_mirrored()
    x = torch.randn(64, 1, 28, 28)
    with torch.inference_mode():
        top = plain(x).exp().amax(dim=1)
        below = float(top.median())  # half the batch in doubt
        gated = _plain_and_mirrored(mirror_below=below)[1]
        doubt = top < below
        assert 0 < int(doubt.sum()) < len(x)
        out = gated(x)
        assert torch.allclose(out[doubt], always(x)[doubt], atol=1e-5)
        assert torch.allclose(out[~doubt], plain(x)[~doubt], atol=1e-5)
        assert torch.allclose(for_inference(gated, ARCHITECTURES["cnn"])(x), out, atol=1e-4)
        gated.mirror_below = 1e-6  # no image in doubt: the plain answers, and no empty pass fails
        assert torch.allclose(gated(x), plain(x), atol=1e-6)
    for bad in (0, 1.5, True, "0.8"):
        with pytest.raises(ValueError, match=r"mirror_below must be a number in \(0, 1\]"):
            model_args_for("cnn", {"mirror": True, "mirror_below": bad})
    with pytest.raises(ValueError, match="mirror_below applies with mirror only"):
        model_args_for("cnn", {"mirror_below": 0.8})


def test_models_without_convolutions_are_served_as_an_unchanged_copy() -> None:
    """Always a copy: saliency runs the original while the inference thread hooks the copy."""
    for arch, model in (("network", Network(784, 10, [32, 16])), ("classifier", Classifier())):
        served = for_inference(model.eval(), ARCHITECTURES[arch])
        assert served is not model and not served.training
        assert [type(m) for m in served.modules()] == [type(m) for m in model.modules()]
        x = torch.randn(4, 1, 28, 28)
        with torch.inference_mode():
            assert torch.equal(served(x), model(x))


def test_batchnorm_without_running_statistics_or_with_hooks_is_left_unfolded() -> None:
    """Found in review: folding needs running statistics, and a hook would be bypassed."""
    model = _trained_looking(FashionCNN())
    first = model.features[0]
    first[1] = nn.BatchNorm2d(32, track_running_stats=False)  # batch statistics: nothing to fold
    second = model.features[1]
    second[1].register_forward_hook(lambda module, args, out: out * 2)
    served = for_inference(model.eval(), ARCHITECTURES["cnn"])
    assert isinstance(served.features[0][1], nn.BatchNorm2d)
    assert isinstance(served.features[1][1], nn.BatchNorm2d)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in served.modules()) == 2  # the other two folded
    x = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        assert torch.allclose(served(x), model(x), atol=1e-4)
