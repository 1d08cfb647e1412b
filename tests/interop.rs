//! Real NBD clients against the real binary: libnbd's nbdinfo and nbdcopy, qemu-img and qemu-io.
//! These tools are required (CI installs them); a missing one fails the test with a clear message.

mod common;

use common::*;
use std::process::Command;
use std::time::Duration;

const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

fn run(cmd: &mut Command) -> ToolOutput {
    run_bounded(cmd, TOOL_TIMEOUT)
}

/// The nbdinfo --json value of `key`, or a panic showing the output.
fn info_value<'a>(json: &'a str, key: &str) -> &'a str {
    json_value(json, key).unwrap_or_else(|| panic!("nbdinfo --json has no `{key}`:\n{json}"))
}

#[test]
fn nbdinfo_reports_size_and_capabilities() {
    require_tool("nbdinfo");
    let dir = TempDir::new("nbdinfo");
    let file = dir.join("disk.img");
    let size = 10 * MIB + 4096;
    make_random_file(&file, size, 1);
    let server = Server::start(&file, &[]);

    let out = run(Command::new("nbdinfo").arg("--json").arg(server.uri()));
    out.assert_success("nbdinfo --json");
    let j = &out.stdout;
    assert_eq!(info_value(j, "export-size"), size.to_string(), "{j}");
    assert_eq!(info_value(j, "is_read_only"), "false", "{j}");
    for key in ["can_flush", "can_fua", "can_trim", "can_zero"] {
        assert_eq!(info_value(j, key), "true", "{key} in:\n{j}");
    }
    // `--multi-conn auto`: advertised only with more than 2 CPUs.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert_eq!(info_value(j, "can_multi_conn"), (cpus > 2).to_string(), "{cpus} CPUs:\n{j}");
    // Fixed newstyle with structured replies, and base:allocation offered.
    assert_eq!(info_value(j, "protocol"), "newstyle-fixed", "{j}");
    assert!(j.contains("base:allocation"), "no base:allocation in:\n{j}");
}

/// `--multi-conn on|off` overrides the CPU rule; nbdcopy then opens one connection or several.
#[test]
fn multi_conn_on_and_off_are_what_nbdinfo_and_nbdcopy_see() {
    require_tool("nbdinfo");
    require_tool("nbdcopy");
    let dir = TempDir::new("multi-conn");
    let (file, input) = served_and_input(&dir, 8 * MIB, 12);
    for (when, advertised) in [("on", true), ("off", false)] {
        let server = Server::start(&file, &["--multi-conn", when]);
        let out = run(Command::new("nbdinfo").arg("--json").arg(server.uri()));
        out.assert_success("nbdinfo --json");
        assert_eq!(info_value(&out.stdout, "can_multi_conn"), advertised.to_string(), "{when}");
        let out = run(Command::new("nbdcopy")
            .args(["--connections=4", "--threads=4"])
            .arg(&input)
            .arg(server.uri()));
        out.assert_success("nbdcopy");
        assert_files_equal(&input, &file);
        // nbdinfo's connection, then nbdcopy's: one without the flag, more with it. Waiting for
        // a third line costs the "off" case its whole (short) bound, and proves there is none.
        let copies = server.wait_line_count(": connected", 3, Duration::from_secs(1)) - 1;
        assert_eq!(copies > 1, advertised, "--multi-conn {when}: nbdcopy opened {copies} connections");
    }
}

#[test]
fn nbdinfo_reports_read_only_export() {
    require_tool("nbdinfo");
    let dir = TempDir::new("nbdinfo-ro");
    let file = dir.join("disk.img");
    make_random_file(&file, 2 * MIB, 2);
    let server = Server::start(&file, &["--read-only"]);

    let out = run(Command::new("nbdinfo").arg("--json").arg(server.uri()));
    out.assert_success("nbdinfo --json");
    assert_eq!(info_value(&out.stdout, "is_read_only"), "true", "{}", out.stdout);
    assert_eq!(info_value(&out.stdout, "export-size"), (2 * MIB).to_string());
}

/// nbdinfo --map over a sparse file: data where we wrote, hole (type bit 0) + zero elsewhere.
#[test]
fn nbdinfo_map_shows_holes_of_sparse_file() {
    require_tool("nbdinfo");
    let dir = TempDir::new("nbdinfo-map");
    let file = dir.join("sparse.img");
    let size = 16 * MIB;
    make_sparse_file(&file, size);
    write_at(&file, MIB, &random_bytes(64 * KIB as usize, 3));
    write_at(&file, 8 * MIB, &random_bytes(MIB as usize, 4));
    let server = Server::start(&file, &[]);

    let out = run(Command::new("nbdinfo").arg("--map").arg(server.uri()));
    out.assert_success("nbdinfo --map");
    let map = parse_nbdinfo_map(&out.stdout);
    assert!(!map.is_empty(), "no extents in:\n{}", out.stdout);
    // The extents tile the export.
    let mut pos = 0;
    for (off, len, _, _) in &map {
        assert_eq!(*off, pos, "extents not contiguous:\n{}", out.stdout);
        pos += len;
    }
    assert_eq!(pos, size, "extents do not cover the export:\n{}", out.stdout);

    let type_at = |at: u64| -> u32 {
        map.iter()
            .find(|(off, len, _, _)| *off <= at && at < off + len)
            .map(|e| e.2)
            .unwrap_or_else(|| panic!("no extent covers {at}:\n{}", out.stdout))
    };
    // Written regions are data (no hole bit, no zero bit).
    for at in [MIB, MIB + 64 * KIB - 1, 8 * MIB, 9 * MIB - 1] {
        assert_eq!(type_at(at) & 3, 0, "offset {at} should be data:\n{}", out.stdout);
    }
    // Never-written regions are holes that read as zero.
    for at in [0, MIB - 1, 2 * MIB, 7 * MIB, 10 * MIB, size - 1] {
        assert_eq!(type_at(at) & 3, 3, "offset {at} should be hole,zero:\n{}", out.stdout);
    }
}

#[test]
fn nbdcopy_reads_64mib_random_file_identically() {
    require_tool("nbdcopy");
    let dir = TempDir::new("nbdcopy-read");
    let file = dir.join("src.img");
    make_random_file(&file, 64 * MIB, 5);
    let server = Server::start(&file, &[]);
    let out_file = dir.join("out.img");

    let out = run(Command::new("nbdcopy").arg(server.uri()).arg(&out_file));
    out.assert_success("nbdcopy nbd:// out.img");
    assert_files_equal(&file, &out_file);
}

#[test]
fn nbdcopy_writes_64mib_random_file_identically() {
    require_tool("nbdcopy");
    let dir = TempDir::new("nbdcopy-write");
    let (file, input) = served_and_input(&dir, 64 * MIB, 6);
    let mut server = Server::start(&file, &[]);

    let out = run(Command::new("nbdcopy").arg(&input).arg(server.uri()));
    out.assert_success("nbdcopy in.img nbd://");
    assert_files_equal(&input, &file);
    server.assert_alive("after nbdcopy wrote 64 MiB");
}

/// A sparse export with three data regions; returns (file, [(offset, data)]).
fn sparse_with_data(dir: &TempDir, size: u64) -> (std::path::PathBuf, Vec<(u64, Vec<u8>)>) {
    let file = dir.join("sparse.img");
    make_sparse_file(&file, size);
    let regions = vec![
        (MIB, random_bytes(MIB as usize, 7)),
        (10 * MIB, random_bytes(512 * KIB as usize, 8)),
        (size - MIB, random_bytes(MIB as usize, 9)),
    ];
    for (off, data) in &regions {
        write_at(&file, *off, data);
    }
    (file, regions)
}

#[test]
fn qemu_img_convert_is_identical_and_stays_sparse() {
    require_tool("qemu-img");
    let dir = TempDir::new("qemu-convert");
    let size = 64 * MIB;
    let (file, _) = sparse_with_data(&dir, size);
    let server = Server::start(&file, &[]);
    let out_file = dir.join("out.img");

    let out = run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(server.uri())
        .arg(&out_file));
    out.assert_success("qemu-img convert");
    assert_files_equal(&file, &out_file);
    let src = allocated_bytes(&file);
    let dst = allocated_bytes(&out_file);
    assert!(
        dst <= src + MIB,
        "converted copy is not sparse: {dst} bytes allocated vs {src} in the source (size {size})"
    );
}

#[test]
fn qemu_img_map_shows_holes() {
    require_tool("qemu-img");
    let dir = TempDir::new("qemu-map");
    let size = 64 * MIB;
    let (file, regions) = sparse_with_data(&dir, size);
    let server = Server::start(&file, &[]);

    let out = run(Command::new("qemu-img").args(["map", "--output=json", "-f", "raw"]).arg(server.uri()));
    out.assert_success("qemu-img map");
    let map = parse_qemu_map(&out.stdout);
    assert!(!map.is_empty(), "no extents in:\n{}", out.stdout);
    assert!(out.stdout.contains("\"data\": false"), "qemu-img map shows no hole:\n{}", out.stdout);
    let data_at = |at: u64| -> bool {
        map.iter()
            .find(|(s, l, _, _)| *s <= at && at < s + l)
            .map(|e| e.2)
            .unwrap_or_else(|| panic!("no extent covers {at}:\n{}", out.stdout))
    };
    for (off, data) in &regions {
        assert!(data_at(*off), "written offset {off} not data:\n{}", out.stdout);
        assert!(data_at(off + data.len() as u64 - 1), "end of region at {off} not data:\n{}", out.stdout);
    }
    for at in [0, 4 * MIB, 20 * MIB, 40 * MIB] {
        assert!(!data_at(at), "offset {at} should be a hole:\n{}", out.stdout);
    }
}

/// qemu-io: FUA write, flush, discard (trim) and write -z (zeroes); checked from the file itself.
#[test]
fn qemu_io_fua_flush_discard_and_zero_writes_land_in_file() {
    require_tool("qemu-io");
    let dir = TempDir::new("qemu-io");
    let file = dir.join("disk.img");
    let size = 8 * MIB;
    make_random_file(&file, size, 10);
    let original = read_at(&file, 0, size as usize);
    let mut server = Server::start(&file, &[]);

    let out = run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(["-c", "write -P 0xab -f 0 64k"])
        .args(["-c", "flush"])
        .args(["-c", "discard 1M 1M"])
        .args(["-c", "write -z 2M 64k"])
        .args(["-c", "write -z -u 3M 128k"])
        .arg(server.uri()));
    out.assert_success("qemu-io");
    assert!(
        !out.stdout.contains("failed") && !out.stderr.contains("failed"),
        "qemu-io reported a failure:\n{}\n{}",
        out.stdout,
        out.stderr
    );

    assert_file_range(&file, 0, &[0xab; 64 * 1024], "FUA write -P 0xab");
    assert_file_range(&file, MIB, &vec![0u8; MIB as usize], "discard 1M 1M");
    assert_file_range(&file, 2 * MIB, &[0u8; 64 * 1024], "write -z 2M 64k");
    assert_file_range(&file, 3 * MIB, &[0u8; 128 * 1024], "write -z -u 3M 128k");
    // Everything else is untouched.
    for (from, to) in [(64 * KIB, MIB), (2 * MIB + 64 * KIB, 3 * MIB), (3 * MIB + 128 * KIB, size)] {
        assert_file_range(
            &file,
            from,
            &original[from as usize..to as usize],
            "bytes outside the written ranges",
        );
    }
    server.assert_alive("after qemu-io");
}

/// A 1 GiB sparse export written with 64 MiB of zeros (plain WRITEs with zero payload) stays
/// sparse.
#[test]
fn qemu_io_zero_pattern_writes_keep_1gib_file_sparse() {
    require_tool("qemu-io");
    let dir = TempDir::new("qemu-io-zero");
    let file = dir.join("big.img");
    make_sparse_file(&file, GIB);
    let server = Server::start(&file, &[]);

    let out = run(Command::new("qemu-io")
        .args(["-f", "raw"])
        .args(["-c", "write -P 0 0 64M"])
        .args(["-c", "write -P 0 512M 16M"])
        .args(["-c", "flush"])
        .arg(server.uri()));
    out.assert_success("qemu-io write -P 0");
    assert_eq!(file_len(&file), GIB);
    let used = allocated_bytes(&file);
    assert!(used <= 256 * KIB, "writing zeros allocated {used} bytes in a sparse 1 GiB file");
}
