import pytest
import torch
from torch import nn

from waggle_trainer.remat.chain import OutOfPlace, build_resnet, chain_stages, named_stages


def run(stages, x):
    for stage in stages:
        x = stage(x)
    return x


def test_sequential_children_and_nested_sequentials_are_flattened():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.Sequential(nn.Tanh(), nn.Sequential(nn.Linear(8, 8))), nn.Linear(8, 2)
    )
    named = named_stages(model)
    assert [n for n, _ in named] == ["0", "1.0", "1.1.0", "2"]
    assert named[0][1] is model[0] and named[2][1] is model[1][1][0]
    x = torch.randn(3, 4)
    torch.testing.assert_close(run(chain_stages(model), x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    "arch, blocks",
    [("resnet18", 8), ("resnet34", 16), ("resnet50", 16), ("resnet101", 33), ("resnet152", 50)],
)
def test_resnet_stages(arch, blocks):
    model = build_resnet(arch, num_classes=7)
    names = [n for n, _ in named_stages(model)]
    assert names[:4] == ["conv1", "bn1", "relu", "maxpool"]
    assert names[-3:] == ["avgpool", "flatten", "fc"]
    assert len(names) == 4 + blocks + 3
    assert names[4] == "layer1.0" and names[-4].startswith("layer4.")
    assert model.fc.out_features == 7


def test_resnet_chain_equals_model_and_leaves_it_unmodified():
    torch.manual_seed(0)
    model = build_resnet("resnet18", num_classes=5).eval()
    stages = chain_stages(model)
    assert isinstance(stages[2], OutOfPlace) and stages[2].inner is model.relu
    assert model.relu.inplace is True  # the model is not modified
    assert isinstance(stages[13], nn.Flatten)
    x = torch.randn(2, 3, 40, 40)
    torch.testing.assert_close(run(stages, x), model(x), rtol=0, atol=0)
    assert model.relu.inplace is True


def test_out_of_place_keeps_input_and_follows_training_flag():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Dropout(0.5, inplace=True))
    stages = chain_stages(model)
    assert isinstance(stages[1], OutOfPlace) and isinstance(stages[2], OutOfPlace)
    x = torch.randn(16, 4)
    before = x.clone()
    version = x._version
    y = stages[1](x)
    assert x._version == version
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    torch.testing.assert_close(y, torch.relu(before), rtol=0, atol=0)
    torch.manual_seed(3)
    dropped = stages[2](x)
    torch.manual_seed(3)
    reference = nn.functional.dropout(x.clone(), 0.5, training=True)
    torch.testing.assert_close(dropped, reference, rtol=0, atol=0)  # same RNG draws as in place
    model.eval()
    torch.testing.assert_close(stages[2](x), x, rtol=0, atol=0)  # wrapper follows model.eval()


def test_unsupported_models_are_rejected():
    with pytest.raises(TypeError, match="nn.Sequential or a torchvision ResNet"):
        named_stages(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="empty"):
        named_stages(nn.Sequential())
    with pytest.raises(ValueError, match="unknown ResNet"):
        build_resnet("resnet9000")


def test_build_resnet_does_not_download(monkeypatch):
    import torch.hub

    def refuse(*args, **kwargs):
        raise AssertionError("download attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    model = build_resnet("resnet18", num_classes=3)
    assert model.fc.out_features == 3
