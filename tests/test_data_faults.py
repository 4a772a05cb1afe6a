"""Images that would silently train as garbage or stop a run late: high-bit-depth PNGs are scaled to
8 bits (not clipped white), missing and 0-byte files stop the run at start with one line."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, make_subset
from common.data import ImageDataset, Uint8Images, scan, to_rgb

SMALL = TINY + ['--batch-size', '8', '--moco-k', '16', '--bn-splits', '2']


def png48(a):
    """A 16-bit-per-channel RGB PNG of the HxWx3 uint16 array `a` (Pillow cannot write one)."""
    raw = b''.join(b'\0' + row.astype('>u2').tobytes() for row in a)  # filter 0 per row

    def chunk(kind, data):
        return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    ihdr = struct.pack('>IIBBBBB', a.shape[1], a.shape[0], 16, 2, 0, 0, 0)
    return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(raw))
            + chunk(b'IEND', b''))


def loaded(folder):
    """The first image of `folder` as HxWx3 uint8 through ImageDataset and through Uint8Images."""
    samples, classes = scan(folder)
    pil = np.asarray(ImageDataset(samples, classes)[0][0])
    u8 = Uint8Images(samples, classes)[0][0].permute(1, 2, 0).numpy()
    return pil, u8


def test_16bit_grey_png_is_scaled_not_clipped(tmp_path):
    a = np.arange(65536, dtype=np.uint16).reshape(256, 256)  # every 16-bit value once
    Image.fromarray(a).save(tmp_path / 'ramp.png')
    assert Image.open(tmp_path / 'ramp.png').mode in ('I;16', 'I')  # read back as 16-bit
    want = np.repeat(np.round(a / 257).astype(np.uint8)[..., None], 3, axis=2)
    for got in loaded(tmp_path):
        assert got.dtype == np.uint8 and np.array_equal(got, want)


def test_48bit_rgb_png(tmp_path):
    a = np.random.default_rng(0).integers(0, 65536, (32, 48, 3)).astype(np.uint16)
    (tmp_path / 'rgb48.png').write_bytes(png48(a))
    for got in loaded(tmp_path):  # Pillow decodes to 8 bits itself, keeping the high byte
        assert got.shape == (32, 48, 3) and np.array_equal(got, a >> 8)
        assert np.abs(got.astype(int) - np.round(a / 257)).max() <= 1


def test_to_rgb_modes():
    v = np.array([[0, 257, 32768, 65535]], dtype=np.uint16)
    exact = np.round(v / 257)
    for img in (Image.fromarray(v.astype('>u2')), Image.fromarray(v.astype(np.int32), 'I')):
        assert img.mode in ('I;16B', 'I')
        assert np.array_equal(np.asarray(to_rgb(img))[..., 0], exact)
    big = Image.fromarray(np.array([[-5, 0, 2 ** 30, 2 ** 31 - 1]], dtype=np.int32), 'I')
    assert np.asarray(to_rgb(big))[0, :, 0].tolist() == [0, 0, 128, 255]  # int32 range, negatives 0
    unit = Image.fromarray(np.array([[0, 0.5, 1]], dtype=np.float32), 'F')
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-3, 7.4, 300, np.nan]], dtype=np.float32), 'F')
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 7, 255, 0]  # clipped to [0, 255]
    rgba = Image.fromarray(np.arange(48, dtype=np.uint8).reshape(2, 6, 4), 'RGBA')
    for img in (rgba, rgba.convert('L'), rgba.convert('P'), rgba.convert('1'), rgba.convert('CMYK')):
        out = to_rgb(img)
        assert out.mode == 'RGB' and np.array_equal(np.asarray(out), np.asarray(img.convert('RGB')))


def data_exit(tmp_path, data, *extra):
    """The one-line SystemExit message of a MoCo run on `data` that must stop at start."""
    import moco
    with pytest.raises(SystemExit) as e:
        moco.main([str(data), *SMALL, *extra, '--output-dir', str(tmp_path / 'out')])
    msg = str(e.value)
    assert '\n' not in msg and not list((tmp_path / 'out').glob('*.pth'))
    return msg


def test_list_with_missing_and_empty_files_stops_at_start(tmp_path):
    root = make_subset(tmp_path / 'data', 2)
    files = sorted(p.relative_to(tmp_path) for p in root.rglob('*.jpg'))
    (tmp_path / files[3]).write_bytes(b'')
    lst = tmp_path / 'list.txt'
    lst.write_text(''.join(f'{f} 0\n' for f in files) + 'data/train/cat/gone.jpg 1\n')
    msg = data_exit(tmp_path, lst)
    assert msg.startswith(f'data: 2 of 21 images in {lst} are missing or empty: ')
    assert f'{files[3]} (0 bytes), data/train/cat/gone.jpg (missing); remove them from the list' in msg


@pytest.mark.parametrize('device_aug', ['off', 'files'])
def test_folder_with_empty_jpg_stops_at_start(tmp_path, device_aug):
    root = make_subset(tmp_path / 'data', 2)
    (root / 'train' / 'dog' / 'empty.jpg').write_bytes(b'')
    msg = data_exit(tmp_path, root, '--device-aug', device_aug)
    assert msg == (f'data: 1 of 21 images in {root / "train"} are missing or empty: '
                   f'{os.path.join("dog", "empty.jpg")} (0 bytes); remove or replace them')


def test_scan_reports_dangling_links_and_first_few(tmp_path):
    for i in range(7):
        (tmp_path / 'c' / f'{i}.jpg').parent.mkdir(exist_ok=True)
        (tmp_path / 'c' / f'{i}.jpg').write_bytes(b'' if i else b'x')
    (tmp_path / 'c' / 'link.jpg').symlink_to(tmp_path / 'nowhere.jpg')
    with pytest.raises(ValueError, match=r'^7 of 8 images .*: c/1.jpg \(0 bytes\), .*c/5.jpg \(0 bytes\), '
                                         r'\.\.\.; remove or replace them$'):
        scan(tmp_path)


def test_scan_order_as_sorted_os_walk(tmp_path):
    """The stat pass walks with os.scandir; `samples` must stay what sorted(os.walk(...)) gave."""
    for rel in ('a/x/1.jpg', 'a/x b/2.JPG', 'a/x-b/3.png', 'a/x/q/4.jpg', 'a/5.jpg', 'a/.h/6.jpg', 'a/B.jpg',
                'a/n.txt', 'b/10.jpg', 'b/2.jpg', '.hidden/7.jpg', 'c/s/8.jpeg'):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b'x')
    (tmp_path / 'b' / 'lnk').symlink_to(tmp_path / 'c')
    (tmp_path / 'b' / '0.jpg').symlink_to(tmp_path / 'b' / '2.jpg')
    want = []
    for label, c in enumerate(['a', 'b', 'c']):
        for root, _, names in sorted(os.walk(tmp_path / c, followlinks=True)):
            want += [(os.path.join(root, n), label) for n in sorted(names) if n.endswith(('jpg', 'JPG', 'png', 'jpeg'))]
    assert scan(tmp_path) == (want, ['a', 'b', 'c']) and len(want) == 12


def test_undecodable_file_still_stops_mid_run(tmp_path):
    (tmp_path / 'bad.jpg').write_bytes(b'not a jpeg')  # nonzero: passes the stat pass
    ds = ImageDataset(*scan(tmp_path))
    with pytest.raises(RuntimeError, match=f'cannot read image {tmp_path / "bad.jpg"}.*--resume'):
        ds.load(0)
    assert torch.is_tensor(Uint8Images(*scan(tmp_path), raw=True)[0][0])  # raw bytes read, not decoded
