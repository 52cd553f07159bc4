"End-to-end tests of vidkit.prepare, `vidkit prepare` and data_scripts/: miniature official layouts, loopback downloads, resume, bad files."
import contextlib, csv, io, json, os, re, shutil, subprocess, sys, threading, zipfile, http.server
from pathlib import Path
import pytest
from vidkit.core import VideoDecodeError
from vidkit.encode import make_test_video
from vidkit.io import open_video, probe
from vidkit.datasets import read_hmdb51, read_ucf101, read_kinetics_csv, read_ssv2, read_video_list, read_rawframe_list
from vidkit.download import download_file, DownloadError
from vidkit.cli_data import prepare_main
from vidkit.prepare import (extract_archive, extract_frames, resize_videos, build_file_list, make_mini_archives,
                            prepare_kinetics, MissingToolError, PrepareError, MissingArchivesError, FRAMES_MARKER, SSV2_JSON)

REPO = Path(__file__).resolve().parents[1]
SIZE = (32, 40)

# ---------------------------------------------------------------- a loopback HTTP server (127.0.0.1, one thread)
class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self):
        srv = self.server
        name = self.path.lstrip('/')
        srv.log.append((name, self.headers.get('Range')))
        data = srv.files.get(name)
        if data is None: self.send_error(404); return
        start, m = 0, re.fullmatch(r'bytes=(\d+)-', self.headers.get('Range') or '')
        if m and srv.ranges and int(m.group(1)) < len(data):
            start = int(m.group(1))
            self.send_response(206); self.send_header('Content-Range', f'bytes {start}-{len(data)-1}/{len(data)}')
        else: self.send_response(200)
        self.send_header('Content-Length', str(len(data) - start)); self.end_headers()
        body = data[start:]
        if srv.cut.pop(name, None): body = body[:len(body) // 3]     # a dropped connection, once
        self.wfile.write(body)

@contextlib.contextmanager
def serve(files, ranges=True, cut=()):
    srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), _Handler)
    srv.files, srv.ranges, srv.cut, srv.log = dict(files), ranges, {c: True for c in cut}, []
    srv.url = f'http://127.0.0.1:{srv.server_address[1]}'
    th = threading.Thread(target=srv.serve_forever, daemon=True); th.start()
    try: yield srv
    finally:
        srv.shutdown(); srv.server_close(); th.join(5)

def run(*argv):
    "prepare_main with captured output: (status, stdout, stderr)."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = prepare_main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()

def mtimes(paths): return {str(p): Path(p).stat().st_mtime_ns for p in paths}

def failed_rows(folder):
    with open(Path(folder)/'failed.csv', newline='') as f: return list(csv.DictReader(f))

# ---------------------------------------------------------------- downloads
def test_download_resumes_with_range_and_restarts_without(tmp_path):
    blob = os.urandom(200_000)
    with serve({'a.bin': blob, 'b.bin': blob}, cut=['a.bin']) as srv:
        with pytest.raises(DownloadError, match='incomplete'):
            download_file(f'{srv.url}/a.bin', tmp_path/'a.bin', progress=False, chunk_size=4096)
        part = (tmp_path/'a.bin.part').stat().st_size
        assert 0 < part < len(blob) and not (tmp_path/'a.bin').exists()
        download_file(f'{srv.url}/a.bin', tmp_path/'a.bin', progress=False)
        assert srv.log[-1] == ('a.bin', f'bytes={part}-')              # resumed where it stopped
        assert (tmp_path/'a.bin').read_bytes() == blob and not (tmp_path/'a.bin.part').exists()
        n = len(srv.log)
        download_file(f'{srv.url}/a.bin', tmp_path/'a.bin', progress=False)  # already there: no request
        assert len(srv.log) == n
        with pytest.raises(DownloadError, match='HTTP 404'):
            download_file(f'{srv.url}/missing.bin', tmp_path/'missing.bin', progress=False)
    (tmp_path/'b.bin.part').write_bytes(b'garbage that is not the start of the file')
    with serve({'b.bin': blob}, ranges=False) as srv:                     # a server that ignores Range
        download_file(f'{srv.url}/b.bin', tmp_path/'b.bin', progress=False)
    assert (tmp_path/'b.bin').read_bytes() == blob

# ---------------------------------------------------------------- HMDB51 over HTTP, through the CLI
def test_hmdb51_download_unpack_lists_and_rerun(tmp_path):
    mini = make_mini_archives('hmdb51', tmp_path/'server', n_classes=3, n_per_class=3, size=SIZE)
    root = tmp_path/'hmdb51'
    with serve({n: p.read_bytes() for n, p in mini.items()}) as srv:
        code, out, err = run('hmdb51', root, '--base-url', srv.url, '--workers', 2, '--no-progress')
        assert code == 0, err
        assert sorted(os.listdir(root/'archives')) == ['hmdb51_org', 'hmdb51_org.rar', 'test_train_splits', 'test_train_splits.rar']
        for split in (1, 2, 3):
            for sub, fn in (('train', 'train'), ('test', 'val')):
                recs, vocab = read_hmdb51(root, split=split, subset=sub)
                lst, _ = read_video_list(root/f'hmdb51_{fn}_split_{split}_videos.txt', data_root=root/'videos')
                assert [(str(r.path), r.label) for r in recs] == [(str(r.path), r.label) for r in lst]
        assert vocab == ['brush_hair', 'cartwheel', 'catch'] and (root/'hmdb51_classes.txt').read_text().split() == vocab
        assert len(list((root/'videos').rglob('*.avi'))) == 9 and failed_rows(root) == []
        # a re-run downloads nothing and extracts nothing
        before, n = mtimes((root/'videos').rglob('*.avi')), len(srv.log)
        code, out, err = run('hmdb51', root, '--base-url', srv.url, '--no-progress')
        assert code == 0 and len(srv.log) == n and mtimes((root/'videos').rglob('*.avi')) == before
        assert '0 done' in out

def test_missing_archives_say_what_to_put_where(tmp_path):
    code, out, err = run('ucf101', tmp_path/'ucf', '--no-download')
    assert code == 1
    assert 'UCF101.rar' in err and 'UCF101TrainTestSplits-RecognitionTask.zip' in err and str(tmp_path/'ucf'/'archives') in err
    assert 'https://www.crcv.ucf.edu/data/UCF101/UCF101.rar' in err
    with serve({}) as srv:   # reachable, but the server has no such file
        code, out, err = run('hmdb51', tmp_path/'h', '--base-url', srv.url, '--no-progress')
    assert code == 1 and 'HTTP 404' in err and 'hmdb51_org.rar' in err and str(tmp_path/'h'/'archives') in err

# ---------------------------------------------------------------- RAR
def test_rar_without_any_tool_names_what_to_install(tmp_path, monkeypatch):
    (tmp_path/'bin').mkdir()
    monkeypatch.setenv('PATH', str(tmp_path/'bin'))
    monkeypatch.setitem(sys.modules, 'rarfile', None)
    (tmp_path/'x.rar').write_bytes(b'Rar!\x1a\x07\x01\x00' + bytes(100))
    with pytest.raises(MissingToolError, match='unrar.*7-Zip.*bsdtar.*rarfile'):
        extract_archive(tmp_path/'x.rar', tmp_path/'out')
    assert not [p for p in (tmp_path/'out').iterdir()]   # nothing half-extracted left behind

def test_rar_goes_through_the_tool_on_path(tmp_path, monkeypatch):
    "A stand-in `unrar` (it unzips) checks the command line vidkit builds; a failing one gives its stderr."
    bin_ = tmp_path/'bin'; bin_.mkdir()
    (bin_/'unrar').write_text(f'#!/bin/sh\nexec {sys.executable} -c "import sys, zipfile; '
                              f'assert sys.argv[1:5] == [\'x\', \'-o+\', \'-y\', \'-idq\']; '
                              f'zipfile.ZipFile(sys.argv[5]).extractall(sys.argv[6])" "$@"\n')
    (bin_/'unrar').chmod(0o755)
    monkeypatch.setenv('PATH', str(bin_))
    rar = tmp_path/'a.rar'
    with zipfile.ZipFile(rar, 'w') as z: z.writestr('cls/v.avi', b'video')
    monkeypatch.setattr('vidkit.prepare.common.archive_format', lambda p: 'rar')   # the stand-in unzips: call the zip a RAR
    extract_archive(rar, tmp_path/'out')
    assert (tmp_path/'out'/'cls'/'v.avi').read_bytes() == b'video'
    (bin_/'unrar').write_text('#!/bin/sh\necho "CRC failed in the encrypted file" >&2\nexit 3\n')
    with pytest.raises(PrepareError, match='unrar exited with status 3: CRC failed'):
        extract_archive(rar, tmp_path/'out2')

# ---------------------------------------------------------------- UCF101 + frames + rawframe lists
def test_ucf101_frames_and_rawframe_lists(tmp_path):
    make_mini_archives('ucf101', tmp_path/'dl', n_classes=2, n_per_class=3, size=SIZE, num_frames=6)
    root = tmp_path/'ucf101'
    assert run('ucf101', root, '--archives', tmp_path/'dl', '--no-download', '--no-progress')[0] == 0
    code, out, err = run('extract-frames', root/'UCF-101', root/'rawframes', '--short-side', 16, '--workers', 2, '--no-progress')
    assert code == 0, err
    assert run('build-file-list', 'ucf101', root, '--format', 'rawframes', '--split', 1, '--workers', 2, '--no-progress')[0] == 0
    recs, vocab = read_ucf101(root, split=1, subset='train')
    frames, _ = read_rawframe_list(root/'ucf101_train_split_1_rawframes.txt', data_root=root/'rawframes')
    assert len(frames) == len(recs) == 4 and [r.label for r in frames] == [r.label for r in recs]
    for r in frames:
        with open_video(r.path) as fr: assert fr.num_frames == r.num_frames == 6 and min(fr.height, fr.width) == 16
    assert not (root/'ucf101_train_split_2_rawframes.txt').exists()       # only the split asked for

# ---------------------------------------------------------------- Kinetics: trim full videos, take clips, report missing
def test_kinetics_trim_copy_missing_and_limit(tmp_path):
    mini = make_mini_archives('kinetics400', tmp_path/'dl', n_classes=2, n_per_class=2, size=SIZE)
    root = tmp_path/'k400'
    code, out, err = run('kinetics', root, '--src', mini['downloaded'], '--archives', tmp_path/'dl', '--no-download',
                         '--subsets', 'train', 'val', 'test', '--workers', 2, '--limit', 3, '--no-progress')
    assert code == 0, err
    assert '3 done' in out and 'left for a later run' in out
    first = mtimes((root/'videos_train').iterdir())
    code, out, err = run('kinetics', root, '--src', mini['downloaded'], '--no-download', '--subsets', 'train', 'val', 'test',
                         '--workers', 2, '--no-progress')
    assert code == 0, err
    assert all(Path(p).stat().st_mtime_ns == t for p, t in first.items())   # what the first run made is kept
    recs, vocab = read_kinetics_csv(root/'annotations'/'kinetics_train.csv', root/'videos_train')
    assert vocab == ['abseiling', 'air drumming'] and len(recs) == 4
    for r in recs:
        with open_video(r.path) as v: assert v.num_frames == 10 and v.fps == 10
    rows = failed_rows(root)
    assert len(rows) == 1 and 'videos_test' in rows[0]['path'] and 'not downloaded' in rows[0]['reason']
    lines = (root/'kinetics400_val_list_videos.txt').read_text().splitlines()
    assert sorted(l.split()[1] for l in lines) == ['0', '1'] and all(l.endswith('.mp4 0') or l.endswith('.mp4 1') for l in lines)

def test_kinetics_from_given_csvs(tmp_path):
    src = tmp_path/'yt'
    make_test_video(src/'abcdefghijk.mp4', num_frames=50, size=SIZE, fps=10)      # a 5 s "YouTube" video
    (tmp_path/'train.csv').write_text('label,youtube_id,time_start,time_end,split\n'
                                      'juggling,abcdefghijk,1,3,train\nsinging,abcdefghijk,3,4,train\n')
    rep = prepare_kinetics(tmp_path/'k', src=src, csvs=[tmp_path/'train.csv'], subsets=['train'], download=False,
                           short_side=16, workers=1, progress=False, verbose=False)
    assert sorted(Path(p).name for p in rep.done) == ['abcdefghijk_000001_000003.mp4', 'abcdefghijk_000003_000004.mp4']
    info = probe(tmp_path/'k'/'videos_train'/'abcdefghijk_000001_000003.mp4')
    assert (info.num_frames, info.height) == (20, 16)
    assert (tmp_path/'k'/'kinetics400_train_list_videos.txt').read_text() == 'abcdefghijk_000001_000003.mp4 0\nabcdefghijk_000003_000004.mp4 1\n'

# ---------------------------------------------------------------- Something-Something V2 (parts wrapped in zips)
def test_ssv2_parts_and_labels(tmp_path):
    mini = make_mini_archives('sthv2', tmp_path/'dl', n_classes=2, n_per_class=1, size=SIZE)
    for name in [n for n in mini if n.startswith('20bn-something-something-v2-')]:   # some mirrors zip each part
        with zipfile.ZipFile(tmp_path/'dl'/f'{name}.zip', 'w') as z: z.write(mini[name], name)
        mini[name].unlink()
    root = tmp_path/'ssv2'
    code, out, err = run('ssv2', root, '--archives', tmp_path/'dl', '--no-download', '--num-parts', 3, '--no-progress')
    assert code == 0, err
    assert sorted(os.listdir(root/'annotations')) == sorted(SSV2_JSON.values())
    recs, vocab = read_ssv2(root/'videos', root/'annotations'/SSV2_JSON['labels'], root/'annotations'/SSV2_JSON['val'])
    assert [r.label for r in recs] == [0, 1] and all(os.path.isfile(r.path) for r in recs)
    assert (root/'sthv2_train_list_videos.txt').read_text() == '1001.webm 0\n1002.webm 1\n'
    code, out, err = run('ssv2', root, '--archives', tmp_path/'dl', '--no-download', '--num-parts', 4, '--no-progress')
    assert code == 1 and '20bn-something-something-v2-03' in err      # a part is missing: says which

# ---------------------------------------------------------------- interrupted frame extraction resumes
@pytest.fixture
def videos(tmp_path):
    src = tmp_path/'videos'
    for k in range(6): make_test_video(src/('a' if k < 3 else 'b')/f'v{k}.mp4', num_frames=6 + k, size=SIZE)
    return src

def test_extract_frames_resumes_after_interruption(tmp_path, videos):
    dst = tmp_path/'frames'
    rep = extract_frames(videos, dst, limit=2, workers=2, progress=False, verbose=False)   # "killed" after 2 videos
    assert len(rep.done) == 2 and rep.pending == 4
    done = {Path(p) for p in rep.done}
    stamps = mtimes(p/FRAMES_MARKER for p in done)
    # what a killed worker leaves: a temporary folder, and a frame folder without its marker (an older, cut run)
    (dst/'b'/'.v4.99999-0.tmp').mkdir(parents=True); (dst/'b'/'.v4.99999-0.tmp'/'img_00001.jpg').write_bytes(b'x')
    (dst/'b'/'v5').mkdir(); (dst/'b'/'v5'/'img_00001.jpg').write_bytes(b'partial')
    code, out, err = run('extract-frames', videos, dst, '--workers', 2, '--no-progress')
    assert code == 0, err
    assert '4 done, 2 already done' in out
    assert mtimes(p/FRAMES_MARKER for p in done) == stamps              # the first two were skipped, not redone
    for k in range(6):
        with open_video(dst/('a' if k < 3 else 'b')/f'v{k}') as r: assert r.num_frames == 6 + k
    assert not [p for p in (dst/'b').iterdir() if p.name.startswith('.')]   # leftovers cleaned up
    assert run('extract-frames', videos, dst, '--no-progress')[1].startswith('extract_frames: 0 done, 6 already done')

def test_bad_videos_are_reported_not_fatal(tmp_path, videos):
    (videos/'a'/'corrupt.mp4').write_bytes(b'\x00\x00\x00\x18ftypisom' + bytes(range(256)) * 8)
    good = (videos/'b'/'v5.mp4').read_bytes()
    (videos/'b'/'truncated.mp4').write_bytes(good[:len(good) // 3])
    (videos/'b'/'empty.mp4').touch()
    code, out, err = run('resize', videos, tmp_path/'small', '--short-side', 16, '--ext', '.mp4', '--workers', 2, '--no-progress')
    assert code == 0, err
    bad = {Path(r['path']).name: r['reason'] for r in failed_rows(tmp_path/'small')}
    assert set(bad) == {'corrupt.mp4', 'truncated.mp4', 'empty.mp4'} and 'empty' in bad['empty.mp4']
    assert len(list((tmp_path/'small').rglob('v*.mp4'))) == 6 and 'FAILED' in out
    # keyframes about every second (10 fps -> every 10 frames)
    make_test_video(tmp_path/'k'/'long.mp4', num_frames=30, size=SIZE, fps=10)
    resize_videos(tmp_path/'k', tmp_path/'k16', short_side=16, progress=False, verbose=False)
    import av
    with av.open(str(tmp_path/'k16'/'long.mp4')) as c:
        keys = [i for i, p in enumerate(sorted((p for p in c.demux(video=0) if p.size), key=lambda p: p.pts)) if p.is_keyframe]
    assert keys == [0, 10, 20]
    # everything bad: exit status 1
    only_bad = tmp_path/'only_bad'; only_bad.mkdir()
    shutil.copy(videos/'a'/'corrupt.mp4', only_bad/'x.mp4')
    assert run('extract-frames', only_bad, tmp_path/'f', '--no-progress')[0] == 1

def test_build_file_list_reports_missing_and_bad_arguments(tmp_path):
    make_mini_archives('hmdb51', tmp_path/'dl', n_classes=2, n_per_class=3, size=SIZE)
    root = tmp_path/'h'
    assert run('hmdb51', root, '--archives', tmp_path/'dl', '--no-download', '--no-lists', '--no-progress')[0] == 0
    assert not list(root.glob('*.txt'))
    gone = root/'videos'/'cartwheel'/'Mini_01_cartwheel_u_nm_np1_fr_med_1.avi'
    gone.unlink()
    rep = build_file_list('hmdb51', root, split=[1], verbose=False, shuffle=True, seed=1)
    assert [Path(p).name for p, _ in rep.failed] == [gone.name]
    assert 'cartwheel/Mini_01' not in (root/'hmdb51_train_split_1_videos.txt').read_text()
    assert run('build-file-list', 'nope', root)[0] == 2
    assert run('resize', root/'videos')[0] == 2
    assert run('build-file-list', 'ucf101', root, '--no-progress')[0] == 1   # no UCF layout there

# ---------------------------------------------------------------- the scripts, as subprocesses
def test_scripts_run_as_programs(tmp_path, videos):
    env = {**os.environ, 'PYTHONWARNINGS': 'ignore'}
    r = subprocess.run([sys.executable, REPO/'data_scripts'/'extract_frames.py', '--help'], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.startswith('usage: extract_frames.py') and '--workers' in r.stdout
    r = subprocess.run([sys.executable, REPO/'data_scripts'/'resize_videos.py', videos, tmp_path/'out', '--short-side', '16',
                        '--workers', '2'], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert 'resize_videos: 6 done' in r.stdout
    assert probe(tmp_path/'out'/'b'/'v5.mp4').height == 16

def test_killed_script_resumes(tmp_path):
    "SIGKILL a real extract_frames.py run once its first folder is complete; the re-run keeps that one and does the rest."
    import signal, time
    src, dst = tmp_path/'v', tmp_path/'f'
    # finished folders only: a folder still being written (`.v0.<pid>-<n>.tmp`, renamed when complete) holds its marker too
    done_folders = lambda: sorted(m.parent for m in dst.glob(f'*/{FRAMES_MARKER}') if not m.parent.name.startswith('.'))
    for k in range(8): make_test_video(src/f'v{k}.mp4', num_frames=120, size=(96, 128))
    p = subprocess.Popen([sys.executable, REPO/'data_scripts'/'extract_frames.py', src, dst, '--workers', '1', '--no-progress'],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, 'PYTHONWARNINGS': 'ignore'})
    try:
        deadline = time.time() + 90
        while not done_folders() and p.poll() is None and time.time() < deadline: time.sleep(0.01)
        p.send_signal(signal.SIGKILL)
    finally: p.wait(30)
    complete = done_folders()
    assert 1 <= len(complete) < 8
    stamps = mtimes(m/FRAMES_MARKER for m in complete)
    code, out, err = run('extract-frames', src, dst, '--workers', 2, '--no-progress')
    assert code == 0 and f'{8 - len(complete)} done, {len(complete)} already done' in out
    assert mtimes(m/FRAMES_MARKER for m in complete) == stamps
    assert all(len(os.listdir(dst/f'v{k}')) == 121 for k in range(8)) and not [q for q in dst.iterdir() if q.name.startswith('.')]
