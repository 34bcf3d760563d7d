"""A size the architecture cannot take is a one-line ConfigError before training (models.check_input_size), not a
torch traceback after the data is loaded."""

import pytest

from pipelines.config import Member
from pipelines.errors import ConfigError


def _member(arch, **fields):
    return Member(**({"name": "m", "arch": arch, "pretrained": False, "size": 32, "epochs": 1} | fields))


@pytest.mark.parametrize("arch, fields, size, works_at", [
    ("test_convnext", {"size": 16}, "16", "32"),  # a 4x4 stem and three 2x2 downsamplings: 32 px at least
    ("test_vit", {"stages": [[32, 1], [8, 1]]}, "8", "16"),  # built for 8 px: fewer pixels than one 16 px patch
    ("ens:lenet5", {"size": [8, 32]}, "[8, 32]", "[16, 64]"),
])
def test_too_small_a_size_is_one_line_naming_member_size_and_fix(arch, fields, size, works_at):
    from pipelines.models import check_input_size

    with pytest.raises(ConfigError) as e:
        check_input_size(_member(arch, **fields), 10)
    message = str(e.value)
    assert "\n" not in message and e.value.exit_code == 2
    assert message.startswith(f"member m ({arch}): size {size} is too small for {arch}"), message
    assert f"it runs at {works_at}" in message and "raise the size" in message, message


@pytest.mark.parametrize("arch, fields", [
    ("test_resnet", {}),
    ("test_efficientnet", {"stages": [[16, 1], [[24, 32], 1]]}),
    ("test_convnext", {"size": 32}),
    ("test_vit", {"stages": [[8, 1], [20, 1]]}),  # built for 20 px, padded to the patch (dynamic_img_pad)
    ("ens:lenet5", {"size": 16}),
    ("test_convnext", {"size": 32, "resize": {"size": 8}}),  # the batch augmentation brings 8 px items to 32
])
def test_sizes_the_architecture_takes_pass(arch, fields):
    from pipelines.models import check_input_size

    check_input_size(_member(arch, **fields), 10)
