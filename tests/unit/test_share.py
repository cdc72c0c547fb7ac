"""emulator/share.py: the share transports' QEMU arguments and guest commands, and the files a read-only
share sends back over the console (what data/stage1/tb-put prints: a header, gzip in base64, an end line).
The frames here are made with Python's own gzip and base64, not with the module under test."""

import base64
import gzip
import hashlib
from pathlib import Path

import pytest

from testbench.emulator.share import mount_command, qemu_share_args, receive, send_back
from testbench.errors import BenchError


def _frame(name: str, data: bytes, body: bytes | None = None, size: int | None = None) -> str:
    encoded = base64.encodebytes(gzip.compress(data) if body is None else body).decode()  # 76-char lines
    digest = hashlib.sha256(data).hexdigest()
    return f"TBPUT {name} {len(data) if size is None else size} {digest}\n{encoded}TBPUT-END\n"


def test_receive_writes_each_framed_file_and_leaves_the_rest_of_the_output(tmp_path: Path):
    dtb = bytes(range(256)) * 200  # longer than one base64 line
    output = "cp done\n" + _frame("board.dtb", dtb) + "between\n" + _frame("iomem.txt", b"00000000-3fffffff\n")
    rest = receive(output, tmp_path)
    assert rest == "cp done\nbetween\n"
    assert (tmp_path / "board.dtb").read_bytes() == dtb
    assert (tmp_path / "iomem.txt").read_text() == "00000000-3fffffff\n"


def test_an_empty_file_comes_back_empty(tmp_path: Path):
    assert receive(_frame("kexec-debug.txt", b""), tmp_path) == ""
    assert (tmp_path / "kexec-debug.txt").read_bytes() == b""


def test_output_without_frames_is_left_alone(tmp_path: Path):
    text = "kexec-tools 2.0.25 released 05 Aug 2022\nTBPUT is only a word here\n"
    assert receive(text, tmp_path) == text
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "frame",
    [
        _frame("x.bin", b"payload", body=b"not gzip at all"),  # base64 of something that is not gzip
        _frame("x.bin", b"payload", size=6),  # the announced size differs
        _frame("x.bin", b"payload").replace("\n", "\n!", 1),  # a character base64 does not have
    ],
)
def test_a_garbled_frame_is_a_bench_error_and_writes_nothing(tmp_path: Path, frame: str):
    with pytest.raises(BenchError, match="garbled"):
        receive(frame, tmp_path)
    assert not (tmp_path / "x.bin").exists()


def test_a_file_name_with_a_path_is_refused(tmp_path: Path):
    with pytest.raises(BenchError, match="named"):
        receive(_frame("..", b"x"), tmp_path)


def test_9p_transports_get_their_device_and_a_mount_the_initramfs_gets_neither(tmp_path: Path):
    assert qemu_share_args("virtio-9p-device", tmp_path)[-1] == "virtio-9p-device,fsdev=tbfs,mount_tag=tbshare"
    assert qemu_share_args("virtio-9p-pci", tmp_path)[-1] == "virtio-9p-pci,fsdev=tbfs,mount_tag=tbshare"
    assert f"path={tmp_path}," in qemu_share_args("virtio-9p-pci", tmp_path)[1]
    assert qemu_share_args("initramfs", tmp_path) == []
    assert mount_command("virtio-9p-pci") == mount_command("virtio-9p-device")
    assert "trans=virtio" in (mount_command("virtio-9p-device") or "")
    assert mount_command("initramfs") is None


def test_only_a_read_only_share_sends_files_back():
    assert send_back("virtio-9p-device", "iomem.txt") == []
    assert send_back("initramfs", "iomem.txt", "board.dtb") == ["tb-put /mnt/iomem.txt /mnt/board.dtb"]
    assert send_back("initramfs") == []
