"""The oracle's advice, proven in QEMU: the advised --image-size passes on virt, one MiB less does not.

The advised value is computed by the oracle from the zImage alone; what makes this a test is that QEMU
then boots the real kernel with it. DOMAIN.md derives the boundary independently: the relocated
decompressor's footprint ends at 0x41AEBE78 on virt, so anything >= ~0x1AE4000 must work.
"""

import pytest

from testbench.inputs.images import load_images
from testbench.inputs.zimage import read_zimage
from testbench.machines import get_machine
from testbench.oracle import advise

QEMU_DTB = 0x100000 + 0x1000  # QEMU's 1 MiB virt DTB plus what kexec adds for bootargs and the initrd


@pytest.fixture(scope="module")
def advice():
    virt = get_machine("virt")
    zimage = read_zimage(load_images().zimage)
    ram = [(virt.ram_base, virt.ram_base + virt.default_ram)]
    return advise(zimage, ram, "2.0.25", initrd_size=2 << 20, dtb_size=QEMU_DTB)


def test_advice_is_needed_and_near_the_domain_bound(advice):
    assert advice.needed
    # The initrd lands at kernel_base + ALIGN(image_size) = 0x40008000 + size; it must clear 0x41AEBE78.
    assert 0x40008000 + advice.image_size >= 0x41AEBE78
    assert advice.image_size <= 0x1AE4000 + 0x10000


def test_advised_image_size_passes_in_qemu(run_kexec_case, advice):
    result = run_kexec_case("virt", kexec_args=(f"--image-size={advice.image_size:#x}",))
    assert result.verdict.verdict == "pass", result.verdict
    assert result.load["initrd"]["address"] >= 0x41AEBE78


def test_one_mib_less_than_advised_fails_in_qemu(run_kexec_case, advice):
    result = run_kexec_case("virt", kexec_args=(f"--image-size={advice.image_size - 0x100000:#x}",))
    assert result.verdict.verdict == "fail", result.verdict
