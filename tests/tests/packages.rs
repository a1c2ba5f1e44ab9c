//! The .deb and .rpm packages that `packaging/build` makes (docs/install.md):
//! what they declare and carry, checked with dpkg-deb and rpm, then a real
//! install, upgrade, removal and purge in a chroot over an overlay of a
//! minimal Debian bookworm root, with dpkg and with rpm.
//!
//! The packages are not built here (a release build takes minutes): a test
//! fails, naming the command, when they are missing. The Debian root is
//! made once with debootstrap and cached in /var/cache/weft-ci; each test
//! mounts a throw-away overlay over it, so nothing it does stays.
//!
//! No systemd runs in a chroot. `/run/systemd/system` is created in each
//! overlay, so the maintainer scripts take their "systemd is running" path,
//! and `systemctl` is a stand-in that records every call (and hands
//! enable/disable to the real one with `--root=/`): the tests read from it
//! that nothing was started, and what was restarted or stopped.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use weft_e2e::netns::Host;
use weft_e2e::tempdir::TempDir;

/// The workspace version: the packages' upstream version.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What the Debian root holds besides minbase: what the packages depend on
/// (nftables, procps; libc6 is there already) and systemd for systemd-sysusers,
/// systemctl and deb-systemd-helper, as on a real host.
const ROOT_PACKAGES: &str = "systemd,nftables,procps";
const ROOT_SUITE: &str = "bookworm";
/// Bumped when the way the root is made changes, so that a stale cache is
/// not used.
const ROOT_RECIPE: &str = "1";
const ROOT_CACHE: &str = "/var/cache/weft-ci";
/// debootstrap takes about a minute here; a stuck mirror must not hang CI.
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(600);

const SERVICES: [(&str, &str); 2] = [("weft-agent", "agent"), ("weft-zone", "zone")];

// ---------------------------------------------------------------------------
// Finding the packages

/// The target directory this test was built into: packaging/build writes
/// the packages there too (both follow CARGO_TARGET_DIR).
fn target_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test binary")?;
    // <target>/debug/deps/packages-<hash>
    exe.ancestors()
        .nth(3)
        .map(Path::to_path_buf)
        .context("the test binary is not in <target>/<profile>/deps")
}

/// The newest file in `dir` named `<prefix>...<suffix>`, or a failure that
/// says how to make it.
fn newest(dir: &Path, prefix: &str, suffix: &str) -> Result<PathBuf> {
    let mut found: Vec<(SystemTime, PathBuf)> = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix) && name.ends_with(suffix) {
                let modified = entry.metadata()?.modified()?;
                found.push((modified, entry.path()));
            }
        }
    }
    found.sort();
    found.pop().map(|(_, path)| path).with_context(|| {
        format!(
            "no {prefix}*{suffix} in {}: run packaging/build first (with the same \
             CARGO_TARGET_DIR as the tests)",
            dir.display()
        )
    })
}

struct Packages {
    agent_deb: PathBuf,
    zone_deb: PathBuf,
    ctl_deb: PathBuf,
    agent_rpm: PathBuf,
    zone_rpm: PathBuf,
    ctl_rpm: PathBuf,
}

impl Packages {
    /// The packages of this workspace's version (any revision; the newest
    /// if several were built).
    fn find() -> Result<Packages> {
        let target = target_dir()?;
        let deb = |name: &str| {
            newest(
                &target.join("debian"),
                &format!("{name}_{VERSION}-"),
                "_amd64.deb",
            )
        };
        let rpm = |name: &str| {
            newest(
                &target.join("generate-rpm"),
                &format!("{name}-{VERSION}-"),
                ".x86_64.rpm",
            )
        };
        Ok(Packages {
            agent_deb: deb("weft-agent")?,
            zone_deb: deb("weft-zone")?,
            ctl_deb: deb("weftctl")?,
            agent_rpm: rpm("weft-agent")?,
            zone_rpm: rpm("weft-zone")?,
            ctl_rpm: rpm("weftctl")?,
        })
    }
}

/// The repository's own files the packages ship.
fn repo_file(path: &str) -> Result<String> {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path);
    fs::read_to_string(&full).with_context(|| format!("reading {}", full.display()))
}

// ---------------------------------------------------------------------------
// Running things

/// Runs `cmd` to completion with no input; its stdout, or an error with
/// both outputs when it fails.
fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?} (is it installed? .ci/run installs it)"))
}

/// A child process killed (and reaped) on drop, so that a failing or
/// timed-out test leaves nothing running.
struct Child(std::process::Child);

impl Child {
    /// Waits until it exits, at most `timeout`.
    fn wait(&mut self, what: &str, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("{what} did not finish within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // The whole process group (spawned with process_group(0)):
            // debootstrap's dpkg and chroot children too.
            // SAFETY: kill has no memory-safety preconditions; the child is
            // not reaped yet, so its pid (and group id) cannot be reused.
            unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// The Debian root

/// An exclusive lock on a file (flock), released on drop: test processes
/// running at once make the cached root once between them.
struct FileLock(fs::File);

impl FileLock {
    fn take(path: &Path) -> Result<FileLock> {
        use std::os::fd::AsRawFd;
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own; it blocks until granted.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("locking {}", path.display()));
        }
        Ok(FileLock(file))
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: unlocking a descriptor we own.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The Debian mirror apt on this machine uses (its sources), or
/// `$WEFT_DEBIAN_MIRROR`.
fn debian_mirror() -> Result<String> {
    if let Some(mirror) = std::env::var_os("WEFT_DEBIAN_MIRROR") {
        return Ok(mirror.to_string_lossy().into_owned());
    }
    // deb822 (.sources): the URIs of the stanza whose Suites name the release.
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list.d/debian.sources") {
        for stanza in text.split("\n\n") {
            let field = |name: &str| {
                stanza
                    .lines()
                    .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_owned()))
            };
            if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
                if suites.split_whitespace().any(|s| s == ROOT_SUITE) {
                    if let Some(uri) = uris.split_whitespace().next() {
                        return Ok(uri.to_owned());
                    }
                }
            }
        }
    }
    // One-line format: deb URI bookworm main
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        for line in text.lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.len() >= 3 && words[0] == "deb" && words[2] == ROOT_SUITE {
                return Ok(words[1].to_owned());
            }
        }
    }
    bail!("no Debian {ROOT_SUITE} mirror in apt's sources; set WEFT_DEBIAN_MIRROR")
}

/// A minimal Debian root (debootstrap minbase + ROOT_PACKAGES), extracted
/// under /var/cache/weft-ci and used read-only as the overlays' lower
/// layer. The cache is a tarball (rootfs-pkg-<hash>.tar) keyed on how the
/// root is made; it is made on first use, so an empty cache only costs
/// time (about a minute).
fn debian_root() -> Result<PathBuf> {
    weft_e2e::require_root()?;
    let key = {
        // FNV-1a: a stable hash of the recipe, no dependency needed.
        let recipe = format!("{ROOT_RECIPE} {ROOT_SUITE} minbase {ROOT_PACKAGES}");
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in recipe.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    };
    let cache = Path::new(ROOT_CACHE);
    fs::create_dir_all(cache).with_context(|| format!("creating {ROOT_CACHE}"))?;
    let tar = cache.join(format!("rootfs-pkg-{key}.tar"));
    let dir = cache.join(format!("rootfs-pkg-{key}"));
    // Written last: its presence means the extraction is whole.
    let done = dir.join(".weft-extracted");
    let _lock = FileLock::take(&cache.join(format!("rootfs-pkg-{key}.lock")))?;
    if done.exists() {
        return Ok(dir);
    }
    if !tar.exists() {
        let scratch = cache.join(format!("rootfs-pkg-{key}.build-{}", std::process::id()));
        let _ = fs::remove_dir_all(&scratch);
        let result = bootstrap(&scratch, &tar);
        let _ = fs::remove_dir_all(&scratch);
        result?;
    }
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    run(Command::new("tar")
        .arg("-xpf")
        .arg(&tar)
        .arg("--numeric-owner")
        .arg("-C")
        .arg(&dir))
    .context("extracting the cached Debian root")?;
    fs::write(&done, b"")?;
    Ok(dir)
}

/// debootstrap into `scratch`, then the tarball, renamed into place whole.
fn bootstrap(scratch: &Path, tar: &Path) -> Result<()> {
    let mirror = debian_mirror()?;
    let started = Instant::now();
    let log = fs::File::create(scratch.with_extension("log"))?;
    let mut child = Child(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={ROOT_PACKAGES}")])
            .arg(ROOT_SUITE)
            .arg(scratch)
            .arg(&mirror)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("running debootstrap (apt-get install debootstrap)")?,
    );
    let status = child.wait("debootstrap", DEBOOTSTRAP_TIMEOUT)?;
    ensure!(
        status.success(),
        "debootstrap {ROOT_SUITE} from {mirror} failed ({status}); see {}",
        scratch.with_extension("log").display()
    );
    // apt's downloaded packages are not needed to install ours.
    let _ = fs::remove_dir_all(scratch.join("var/cache/apt/archives"));
    eprintln!(
        "made the Debian root in {:?} (cached in {})",
        started.elapsed(),
        tar.display()
    );
    let partial = tar.with_extension("tar.partial");
    run(Command::new("tar")
        .arg("-cf")
        .arg(&partial)
        .arg("--numeric-owner")
        .arg("-C")
        .arg(scratch)
        .arg("."))
    .context("archiving the Debian root")?;
    fs::rename(&partial, tar)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// A throw-away root: an overlay over the Debian root, in a network
// namespace of its own (the agent's scripts delete an nftables table: they
// must not reach the machine's).

struct Overlay {
    merged: PathBuf,
    mounted: bool,
    // Removed after the unmount (fields drop after `drop`).
    _dir: TempDir,
}

impl Overlay {
    fn mount(lower: &Path) -> Result<Overlay> {
        let dir = TempDir::new("weft-pkg-root")?;
        for d in ["upper", "work", "merged"] {
            fs::create_dir(dir.join(d))?;
        }
        let mut overlay = Overlay {
            merged: dir.join("merged"),
            mounted: false,
            _dir: dir,
        };
        let dir = &overlay._dir;
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                dir.join("upper").display(),
                dir.join("work").display()
            ))
            .arg(&overlay.merged))
        .context("mounting the overlay")?;
        overlay.mounted = true;
        Ok(overlay)
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if self.mounted {
            let ok = Command::new("umount")
                .arg(&self.merged)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                // Something still holds it: detach it, so that it goes when
                // released and the directory can be removed.
                let _ = Command::new("umount").arg("-l").arg(&self.merged).status();
            }
        }
    }
}

/// The stand-in for systemctl: records each call; what only changes unit
/// files (enable, disable, preset, mask, ... which deb-systemd-helper also
/// calls) is the real systemctl's work, offline.
const SYSTEMCTL_SHIM: &str = r#"#!/bin/sh
echo "$*" >> /var/log/systemctl-calls
for arg; do
    case "$arg" in
        enable | disable | reenable | preset | mask | unmask | is-enabled)
            exec /usr/bin/systemctl.real --root=/ "$@" ;;
        -*) ;;
        *) break ;;
    esac
done
exit 0
"#;

struct Root {
    // Dropped first: kills anything left in the namespace before the
    // overlay is unmounted.
    host: Host,
    overlay: Overlay,
}

impl Root {
    fn new() -> Result<Root> {
        let lower = debian_root()?;
        let host = Host::new()?;
        let overlay = Overlay::mount(&lower)?;
        let root = Root { host, overlay };
        fs::create_dir_all(root.path("/run/systemd/system"))?;
        fs::rename(
            root.path("/usr/bin/systemctl"),
            root.path("/usr/bin/systemctl.real"),
        )?;
        fs::write(root.path("/usr/bin/systemctl"), SYSTEMCTL_SHIM)?;
        fs::set_permissions(
            root.path("/usr/bin/systemctl"),
            fs::Permissions::from_mode(0o755),
        )?;
        fs::write(root.path("/var/log/systemctl-calls"), "")?;
        Ok(root)
    }

    /// `path` (absolute, in the root) seen from outside.
    fn path(&self, path: &str) -> PathBuf {
        self.overlay.merged.join(path.trim_start_matches('/'))
    }

    fn exists(&self, path: &str) -> bool {
        self.path(path).symlink_metadata().is_ok()
    }

    fn read(&self, path: &str) -> Result<String> {
        fs::read_to_string(self.path(path)).with_context(|| format!("reading {path} in the root"))
    }

    /// Copies a package into the root's /tmp; its path there.
    fn put(&self, package: &Path) -> Result<String> {
        let name = package
            .file_name()
            .context("a package file name")?
            .to_string_lossy()
            .into_owned();
        fs::copy(package, self.path(&format!("/tmp/{name}")))
            .with_context(|| format!("copying {}", package.display()))?;
        Ok(format!("/tmp/{name}"))
    }

    /// A shell script run in the root (chroot, in the root's network
    /// namespace, no input: a question would fail it).
    fn sh_output(&self, script: &str) -> Result<Output> {
        output(
            self.host
                .command("chroot")
                .arg(&self.overlay.merged)
                .args(["/bin/sh", "-ec", script])
                .env_clear()
                .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
                .env("HOME", "/root")
                .env("LC_ALL", "C")
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
    }

    /// Like `sh_output`; its stdout, or an error with both outputs.
    fn sh(&self, script: &str) -> Result<String> {
        let out = self.sh_output(script)?;
        if !out.status.success() {
            bail!(
                "in the root, `{script}` failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The systemctl calls since the last time they were taken.
    fn take_systemctl_calls(&self) -> Result<Vec<String>> {
        let calls = self.read("/var/log/systemctl-calls")?;
        fs::write(self.path("/var/log/systemctl-calls"), "")?;
        Ok(calls.lines().map(str::to_owned).collect())
    }

    /// The user's passwd entry, if any.
    fn passwd(&self, user: &str) -> Result<Option<String>> {
        Ok(self
            .read("/etc/passwd")?
            .lines()
            .find(|l| l.starts_with(&format!("{user}:")))
            .map(str::to_owned))
    }

    fn group(&self, group: &str) -> Result<bool> {
        Ok(self
            .read("/etc/group")?
            .lines()
            .any(|l| l.starts_with(&format!("{group}:"))))
    }

    fn nft_tables(&self) -> Result<String> {
        self.sh("nft list tables")
    }
}

/// No call started, restarted or reloaded anything.
fn started_nothing(calls: &[String]) -> Result<()> {
    let starting = calls.iter().find(|c| {
        let verb = c.split_whitespace().next().unwrap_or("");
        verb.contains("start")
            || (verb.contains("reload") && verb != "daemon-reload")
            || c.contains("--now")
    });
    ensure!(
        starting.is_none(),
        "the scripts started a unit: {starting:?} (all calls: {calls:?})"
    );
    Ok(())
}

/// The fields of `weft` in /etc/passwd: a system user with home
/// /var/lib/weft and no login shell.
fn check_weft_user(root: &Root) -> Result<()> {
    let entry = root
        .passwd("weft")?
        .context("no weft user after the install")?;
    let fields: Vec<&str> = entry.split(':').collect();
    ensure!(fields.len() == 7, "odd passwd entry {entry:?}");
    let uid: u32 = fields[2].parse()?;
    ensure!(uid < 1000, "weft is not a system user: {entry:?}");
    ensure!(fields[5] == "/var/lib/weft", "home of weft: {entry:?}");
    ensure!(fields[6].ends_with("nologin"), "shell of weft: {entry:?}");
    ensure!(root.group("weft")?, "no weft group");
    Ok(())
}

// ---------------------------------------------------------------------------
// What the packages declare and carry

fn deb_field(deb: &Path, field: &str) -> Result<String> {
    Ok(run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(field))?
        .trim()
        .to_owned())
}

/// The paths in a .deb's data, without the leading `.`.
fn deb_files(deb: &Path) -> Result<Vec<String>> {
    Ok(run(Command::new("dpkg-deb").arg("-c").arg(deb))?
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .map(|p| p.trim_start_matches('.').trim_end_matches('/').to_owned())
        .collect())
}

/// A control file of a .deb (`conffiles`, `postinst`, ...), empty if absent.
fn deb_control(deb: &Path, member: &str) -> Result<String> {
    let out = output(Command::new("dpkg-deb").arg("-I").arg(deb).arg(member))?;
    Ok(if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        String::new()
    })
}

#[test]
fn the_debs_declare_and_carry_what_they_install() -> Result<()> {
    let p = Packages::find()?;
    for (deb, name) in [
        (&p.agent_deb, "weft-agent"),
        (&p.zone_deb, "weft-zone"),
        (&p.ctl_deb, "weftctl"),
    ] {
        ensure!(deb_field(deb, "Package")? == name);
        let version = deb_field(deb, "Version")?;
        ensure!(
            version.starts_with(&format!("{VERSION}-")),
            "{name}: version {version}, not {VERSION}-<revision>"
        );
        ensure!(deb_field(deb, "Architecture")? == "amd64");
        let depends = deb_field(deb, "Depends")?;
        ensure!(
            depends.contains("libc6 (>="),
            "{name} depends on {depends:?}: no libc6"
        );
        for only_agent in ["nftables", "procps"] {
            ensure!(
                depends.contains(only_agent) == (name == "weft-agent"),
                "{name} depends on {depends:?}: only the agent needs {only_agent}"
            );
        }
        let files = deb_files(deb)?;
        ensure!(
            files.contains(&format!("/usr/bin/{name}")),
            "{name}: no binary in {files:?}"
        );
        ensure!(
            files.contains(&format!("/usr/share/doc/{name}/copyright")),
            "{name}: no copyright (license) in {files:?}"
        );
        ensure!(
            files.contains(&format!("/usr/share/doc/{name}/install.md")),
            "{name}: no install.md in {files:?}"
        );
        // The binary is stripped of its debug sections: a few MB, not ~50.
        let listing = run(Command::new("dpkg-deb").arg("-c").arg(deb))?;
        let size: u64 = listing
            .lines()
            .find(|l| l.ends_with(&format!("./usr/bin/{name}")))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("{name}: binary size in {listing}"))?;
        ensure!(
            size < 30 << 20,
            "{name}: the binary is {size} bytes: not stripped?"
        );
    }
    for ((service, short), deb) in SERVICES.iter().zip([&p.agent_deb, &p.zone_deb]) {
        let files = deb_files(deb)?;
        for wanted in [
            format!("/usr/lib/systemd/system/{service}.service"),
            format!("/etc/weft/{short}.yaml"),
            format!("/usr/lib/sysusers.d/{service}.conf"),
        ] {
            ensure!(
                files.contains(&wanted),
                "{service}: no {wanted} in {files:?}"
            );
        }
        ensure!(
            deb_control(deb, "conffiles")?.trim() == format!("/etc/weft/{short}.yaml"),
            "{service}: conffiles are {:?}",
            deb_control(deb, "conffiles")?
        );
        for (script, marker) in [
            ("postinst", "systemd-sysusers"),
            ("prerm", "systemctl stop"),
            ("postrm", "purge"),
        ] {
            let text = deb_control(deb, script)?;
            ensure!(
                text.contains(marker),
                "{service}: {script} lacks {marker:?}: {text:?}"
            );
            ensure!(
                text == repo_file(&format!("packaging/debian/{service}/{script}"))?,
                "{service}: {script} is not packaging/debian/{service}/{script}"
            );
        }
    }
    let agent_files = deb_files(&p.agent_deb)?;
    ensure!(agent_files.contains(&"/usr/share/doc/weft-agent/node-mode.conf.example".to_owned()));
    ensure!(deb_control(&p.agent_deb, "prerm")?.contains("redirect remove"));
    ensure!(deb_control(&p.ctl_deb, "conffiles")?.is_empty());
    ensure!(deb_control(&p.ctl_deb, "postinst")?.is_empty());
    Ok(())
}

fn rpm_query(rpm: &Path, args: &[&str]) -> Result<String> {
    run(Command::new("rpm").arg("-qp").args(args).arg(rpm))
}

#[test]
fn the_rpms_declare_and_carry_what_they_install() -> Result<()> {
    let p = Packages::find()?;
    for (rpm, name) in [
        (&p.agent_rpm, "weft-agent"),
        (&p.zone_rpm, "weft-zone"),
        (&p.ctl_rpm, "weftctl"),
    ] {
        let header = rpm_query(rpm, &["--qf", "%{NAME} %{VERSION} %{ARCH} %{LICENSE}"])?;
        ensure!(
            header == format!("{name} {VERSION} x86_64 Apache-2.0"),
            "{name}: header {header:?}"
        );
        let requires = rpm_query(rpm, &["--requires"])?;
        ensure!(
            requires.lines().any(|l| l.starts_with("libc.so.6")),
            "{name} requires {requires:?}: no libc"
        );
        for only_agent in ["nftables", "/usr/bin/kill"] {
            ensure!(
                requires.lines().any(|l| l.trim() == only_agent) == (name == "weft-agent"),
                "{name} requires {requires:?}: only the agent needs {only_agent}"
            );
        }
        let files = rpm_query(rpm, &["--list"])?;
        ensure!(files.lines().any(|l| l == format!("/usr/bin/{name}")));
        ensure!(files
            .lines()
            .any(|l| l == format!("/usr/share/doc/{name}/install.md")));
    }
    for ((service, short), rpm) in SERVICES.iter().zip([&p.agent_rpm, &p.zone_rpm]) {
        let files = rpm_query(rpm, &["--list"])?;
        for wanted in [
            format!("/usr/lib/systemd/system/{service}.service"),
            format!("/etc/weft/{short}.yaml"),
            format!("/usr/lib/sysusers.d/{service}.conf"),
        ] {
            ensure!(
                files.lines().any(|l| l == wanted),
                "{service}: no {wanted} in {files}"
            );
        }
        // %config(noreplace): flags c (config) and n (noreplace).
        let flags = rpm_query(rpm, &["--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"])?;
        let config = flags
            .lines()
            .find(|l| l.starts_with(&format!("/etc/weft/{short}.yaml ")))
            .context("no config line")?;
        ensure!(
            config.ends_with(" cn") || config.ends_with(" nc"),
            "{service}: /etc/weft/{short}.yaml is not %config(noreplace): {config:?}"
        );
        let scripts = rpm_query(rpm, &["--scripts"])?;
        for (phase, file) in [
            ("postinstall", "postinst"),
            ("preuninstall", "prerm"),
            ("postuninstall", "postrm"),
        ] {
            ensure!(
                scripts.contains(&format!("{phase} scriptlet")),
                "{service}: no %{phase}: {scripts}"
            );
            let body = repo_file(&format!("packaging/debian/{service}/{file}"))?;
            ensure!(
                scripts.contains(body.trim_end()),
                "{service}: the {phase} scriptlet is not packaging/debian/{service}/{file}: {scripts}"
            );
        }
    }
    ensure!(rpm_query(&p.ctl_rpm, &["--scripts"])?.trim().is_empty());
    Ok(())
}

// ---------------------------------------------------------------------------
// dpkg: install, upgrade, remove, purge

/// A newer build of `deb`: the same files under the next revision, and
/// with `conffile_note` (if any) appended to its conffiles, as when a
/// release changes the default config. dpkg-deb repacks it in a fraction
/// of a second, where packaging/build would take a minute.
fn newer_deb(
    deb: &Path,
    dir: &Path,
    revision: u32,
    conffile_note: Option<&str>,
) -> Result<PathBuf> {
    let tree = dir.join(format!("tree-{revision}"));
    let _ = fs::remove_dir_all(&tree);
    run(Command::new("dpkg-deb").arg("-R").arg(deb).arg(&tree))?;
    let control = tree.join("DEBIAN/control");
    let text = fs::read_to_string(&control)?;
    let mut version = String::new();
    let text: String = text
        .lines()
        .map(|l| match l.strip_prefix("Version: ") {
            Some(v) => {
                let upstream = v.rsplit_once('-').map_or(v, |(u, _)| u);
                version = format!("{upstream}-{revision}");
                format!("Version: {version}\n")
            }
            None => format!("{l}\n"),
        })
        .collect();
    fs::write(&control, text)?;
    if let Some(note) = conffile_note {
        let conffiles = fs::read_to_string(tree.join("DEBIAN/conffiles"))?;
        for conffile in conffiles.lines() {
            let path = tree.join(conffile.trim_start_matches('/'));
            let mut body = fs::read_to_string(&path)?;
            body.push_str(note);
            fs::write(&path, body)?;
        }
        // The md5sums must match what is unpacked.
        let sums = run(Command::new("sh").arg("-c").arg(format!(
            "cd {} && find . -path ./DEBIAN -prune -o -type f -print | sed 's|^\\./||' | sort | xargs md5sum",
            tree.display()
        )))?;
        fs::write(tree.join("DEBIAN/md5sums"), sums)?;
    }
    let out = dir.join(format!("newer-{revision}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-b"])
        .arg(&tree)
        .arg(&out))?;
    ensure!(deb_field(&out, "Version")? == version);
    Ok(out)
}

/// Fills in the packaged agent.yaml's placeholders, as an operator (or
/// Ansible) would.
const FILL_AGENT_CONFIG: &str = "sed -i \
    -e 's/CHANGE-ME:5678/zone.example:5678/' \
    -e 's/sha256:CHANGE-ME/sha256:abababababababababababababababababababababababababababababababab/' \
    -e 's/name: CHANGE-ME/name: web/' \
    -e 's/service: CHANGE-ME/service: web/' \
    -e 's/address: CHANGE-ME/address: 10.0.0.2/' \
    -e 's/port: CHANGE-ME/port: 8080/' \
    /etc/weft/agent.yaml";

#[test]
fn the_debs_install_upgrade_keep_edits_and_purge_in_a_debian_root() -> Result<()> {
    let p = Packages::find()?;
    let root = Root::new()?;
    let scratch = TempDir::new("weft-pkg-debs")?;
    let agent = root.put(&p.agent_deb)?;
    let zone = root.put(&p.zone_deb)?;
    let ctl = root.put(&p.ctl_deb)?;

    // Install: the files land, the user is made, the agent is enabled (a
    // configured agent then starts at boot), nothing starts.
    root.sh(&format!("dpkg -i {agent} {zone} {ctl}"))?;
    for path in [
        "/usr/bin/weft-agent",
        "/usr/bin/weft-zone",
        "/usr/bin/weftctl",
        "/usr/lib/systemd/system/weft-agent.service",
        "/usr/lib/systemd/system/weft-zone.service",
        "/usr/lib/sysusers.d/weft-agent.conf",
        "/usr/lib/sysusers.d/weft-zone.conf",
        "/usr/share/doc/weft-agent/node-mode.conf.example",
    ] {
        ensure!(root.exists(path), "{path} is not installed");
    }
    ensure!(root.read("/etc/weft/agent.yaml")? == repo_file("packaging/config/agent.yaml")?);
    ensure!(root.read("/etc/weft/zone.yaml")? == repo_file("packaging/config/zone.yaml")?);
    check_weft_user(&root)?;
    let calls = root.take_systemctl_calls()?;
    started_nothing(&calls)?;
    ensure!(
        calls.iter().any(|c| c == "daemon-reload"),
        "no daemon-reload after the install: {calls:?}"
    );
    ensure!(
        root.exists("/etc/systemd/system/multi-user.target.wants/weft-agent.service"),
        "weft-agent is not enabled"
    );
    ensure!(
        !root.exists("/etc/systemd/system/multi-user.target.wants/weft-zone.service"),
        "weft-zone is enabled: it would start at boot on the packaged defaults"
    );
    // The binaries run on this Debian; the packaged agent config is refused
    // with every field still to fill in.
    root.sh("weft-agent --version && weft-zone --version && weftctl --version")?;
    let check = root.sh_output("weft-agent check -c /etc/weft/agent.yaml")?;
    let said = String::from_utf8_lossy(&check.stderr);
    ensure!(
        !check.status.success(),
        "the placeholder config passed check"
    );
    for field in [
        "controller.address",
        "controller.ca_pin",
        "workload.name",
        "workload.service",
        "workload.address",
        "workload.ports[0].port",
    ] {
        ensure!(
            said.contains(&format!("`{field}`")),
            "check does not name {field}: {said}"
        );
    }

    // The packaged zone settings are valid as shipped.
    let zone_check = root.sh("weft-zone check --config /etc/weft/zone.yaml")?;
    ensure!(
        zone_check.starts_with("zone default: store sqlite:///var/lib/weft/zone/zone.db"),
        "weft-zone check: {zone_check}"
    );

    // The operator configures the agent (and it enrolled once: state).
    root.sh(FILL_AGENT_CONFIG)?;
    root.sh("weft-agent check -c /etc/weft/agent.yaml")?;
    root.sh(
        "printf token > /etc/weft/agent.token && chgrp weft /etc/weft/agent.token \
         && chmod 0640 /etc/weft/agent.token \
         && install -d -o weft -g weft -m 0700 /var/lib/weft/agent \
         && echo '{}' > /var/lib/weft/agent/enrolment.json \
         && install -d -o weft -g weft -m 0700 /var/lib/weft/zone \
         && echo db > /var/lib/weft/zone/zone.db",
    )?;
    let edited = root.read("/etc/weft/agent.yaml")?;

    // Upgrade to a newer build with the same default config: no question
    // (stdin is /dev/null), the edit is kept, a running agent is restarted.
    let newer = newer_deb(&p.agent_deb, scratch.path(), 900, None)?;
    let newer = root.put(&newer)?;
    root.sh(&format!("dpkg -i {newer}"))?;
    ensure!(
        root.read("/etc/weft/agent.yaml")? == edited,
        "the upgrade lost the edit"
    );
    ensure!(!root.exists("/etc/weft/agent.yaml.dpkg-dist"));
    let calls = root.take_systemctl_calls()?;
    // The stand-in systemctl says every unit is active.
    ensure!(
        calls.iter().any(|c| c == "reload weft-agent.service"),
        "the upgrade did not hand the running agent over to its new binary: {calls:?}"
    );
    ensure!(
        !calls
            .iter()
            .any(|c| c.starts_with("stop") || c.starts_with("restart")),
        "the upgrade stopped the agent: {calls:?}"
    );
    ensure!(root
        .sh("dpkg-query -W -f='${Version}' weft-agent")?
        .ends_with("-900"));

    // A node agent cannot hand over: the upgrade restarts it.
    root.sh("sed -i 's/^mode: sidecar/mode: node/' /etc/weft/agent.yaml")?;
    let edited = root.read("/etc/weft/agent.yaml")?;

    // A newer build whose default config changed: dpkg would ask which to
    // keep, and with no terminal it fails; --force-confold answers "keep
    // mine" (apt: -o Dpkg::Options::=--force-confold) and puts the new
    // default beside it.
    let changed = newer_deb(&p.agent_deb, scratch.path(), 901, Some("# a new default\n"))?;
    let changed = root.put(&changed)?;
    let asked = root.sh_output(&format!("dpkg -i {changed}"))?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&asked.stdout),
        String::from_utf8_lossy(&asked.stderr)
    );
    ensure!(
        !asked.status.success() && said.contains("conffile prompt"),
        "dpkg replaced or kept a changed conffile without asking: {said}"
    );
    root.sh(&format!("dpkg -i --force-confold {changed}"))?;
    ensure!(
        root.read("/etc/weft/agent.yaml")? == edited,
        "--force-confold lost the edit"
    );
    ensure!(
        root.read("/etc/weft/agent.yaml.dpkg-dist")?
            .ends_with("# a new default\n"),
        "the new default is not beside the kept file"
    );
    ensure!(
        root.sh("dpkg-query -W -f='${db:Status-Abbrev}' weft-agent")?
            .trim()
            == "ii"
    );
    let calls = root.take_systemctl_calls()?;
    ensure!(
        calls.iter().any(|c| c == "restart weft-agent.service")
            && !calls.iter().any(|c| c.starts_with("reload")),
        "the upgrade did not restart the node agent: {calls:?}"
    );

    // Remove: the agent is stopped and its capture rules go (they would
    // black-hole the host's traffic without it); config, state and the
    // user stay.
    root.sh("nft add table inet weft && nft add table inet other")?;
    root.sh("dpkg --remove weft-agent")?;
    let tables = root.nft_tables()?;
    ensure!(
        !tables.contains("inet weft"),
        "the capture table outlived the package: {tables}"
    );
    ensure!(
        tables.contains("inet other"),
        "the removal took another table: {tables}"
    );
    let calls = root.take_systemctl_calls()?;
    ensure!(
        calls.iter().any(|c| c == "stop weft-agent.service"),
        "the removal did not stop the agent: {calls:?}"
    );
    ensure!(!root.exists("/usr/bin/weft-agent"));
    ensure!(root.read("/etc/weft/agent.yaml")? == edited);
    ensure!(root.exists("/var/lib/weft/agent/enrolment.json"));
    check_weft_user(&root)?;

    // Purge the agent: its config, token and state go; the user stays for
    // weft-zone, which is still installed.
    root.sh("dpkg --purge weft-agent")?;
    for gone in [
        "/etc/weft/agent.yaml",
        "/etc/weft/agent.yaml.dpkg-dist",
        "/etc/weft/agent.token",
        "/var/lib/weft/agent",
        "/var/log/weft",
        "/etc/systemd/system/multi-user.target.wants/weft-agent.service",
        "/etc/systemd/system/weft-agent.service",
    ] {
        ensure!(
            !root.exists(gone),
            "{gone} outlived the purge of weft-agent"
        );
    }
    ensure!(root.exists("/etc/weft/zone.yaml"));
    check_weft_user(&root)?;

    // Purge the rest: nothing of weft is left, the user neither.
    root.sh("dpkg --purge weft-zone weftctl")?;
    for gone in [
        "/etc/weft",
        "/var/lib/weft",
        "/usr/bin/weft-zone",
        "/usr/bin/weftctl",
        "/usr/lib/systemd/system/weft-zone.service",
        "/usr/lib/sysusers.d/weft-zone.conf",
        "/etc/systemd/system/weft-zone.service",
    ] {
        ensure!(!root.exists(gone), "{gone} outlived the purge");
    }
    ensure!(
        root.passwd("weft")?.is_none(),
        "the weft user outlived the purge"
    );
    ensure!(!root.group("weft")?, "the weft group outlived the purge");
    let leftovers = root.sh("dpkg -l | grep -i weft || true")?;
    ensure!(leftovers.trim().is_empty(), "dpkg still knows: {leftovers}");
    Ok(())
}

/// Without systemd-sysusers (a host without systemd), the scripts make
/// the same user with useradd.
#[test]
fn the_user_is_made_without_systemd_sysusers_too() -> Result<()> {
    let p = Packages::find()?;
    let root = Root::new()?;
    fs::remove_file(root.path("/usr/bin/systemd-sysusers"))?;
    let zone = root.put(&p.zone_deb)?;
    root.sh(&format!("dpkg -i {zone}"))?;
    check_weft_user(&root)?;
    started_nothing(&root.take_systemctl_calls()?)?;
    root.sh("dpkg --purge weft-zone")?;
    ensure!(
        root.passwd("weft")?.is_none(),
        "the weft user outlived the purge"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// rpm: into the same Debian root (no RPM distribution can be bootstrapped
// here). rpm's database there is empty, so a stub package provides what
// the root has through dpkg, once each requirement is seen to be there.

/// Whether the Debian root satisfies one rpm requirement.
fn root_satisfies(root: &Root, requirement: &str) -> Result<bool> {
    let name = requirement.split_whitespace().next().unwrap_or(requirement);
    if name.starts_with("rpmlib(") {
        // Features of rpm itself.
        return Ok(true);
    }
    if name.starts_with("rtld(") {
        // A feature of the dynamic loader (GNU hash tables), which glibc
        // provides on RPM distributions.
        return Ok(root.exists("/lib64/ld-linux-x86-64.so.2"));
    }
    if name.starts_with('/') {
        return Ok(root.exists(name));
    }
    // libc.so.6(GLIBC_2.34)(64bit): the library file is what counts.
    let soname = name.split('(').next().unwrap_or(name);
    if soname.contains(".so") {
        return Ok(["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64"]
            .iter()
            .any(|dir| root.exists(&format!("{dir}/{soname}"))));
    }
    Ok(root
        .sh(&format!(
            "dpkg-query -W -f='${{db:Status-Status}}' {name} 2>/dev/null || true"
        ))?
        .trim()
        == "installed")
}

/// Builds the stub that provides `requirements` (rpmbuild, 0.2 s).
fn host_provides_rpm(dir: &Path, requirements: &[String]) -> Result<PathBuf> {
    let top = dir.join("rpmbuild");
    fs::create_dir_all(top.join("SPECS"))?;
    let provides: String = requirements
        .iter()
        .map(|r| format!("Provides: {r}\n"))
        .collect();
    let spec = top.join("SPECS/debian-host-provides.spec");
    fs::write(
        &spec,
        format!(
            "Name: debian-host-provides\nVersion: 12\nRelease: 1\n\
             Summary: What the Debian root provides through dpkg\nLicense: none\n\
             BuildArch: noarch\nAutoReqProv: no\n{provides}\
             %description\nStands for the Debian root's packages in rpm's database.\n\
             %files\n"
        ),
    )?;
    run(Command::new("rpmbuild")
        .arg("--define")
        .arg(format!("_topdir {}", top.display()))
        .args(["--quiet", "-bb"])
        .arg(&spec))?;
    Ok(top.join("RPMS/noarch/debian-host-provides-12-1.noarch.rpm"))
}

#[test]
fn the_rpms_install_reinstall_and_erase_in_a_debian_root() -> Result<()> {
    let p = Packages::find()?;
    let root = Root::new()?;
    let scratch = TempDir::new("weft-pkg-rpms")?;
    let rpms = [&p.agent_rpm, &p.zone_rpm, &p.ctl_rpm];
    let mut provided: Vec<String> = Vec::new();
    for rpm in rpms {
        provided.extend(
            rpm_query(rpm, &["--provides"])?
                .lines()
                .map(|l| l.trim().to_owned()),
        );
    }
    // What the root must give: each requirement not met by the packages
    // themselves (config(weft-agent)) or by rpm (rpmlib(...)).
    let mut requirements: Vec<String> = Vec::new();
    for rpm in rpms {
        for r in rpm_query(rpm, &["--requires"])?.lines() {
            let r = r.trim().to_owned();
            if !r.starts_with("rpmlib(") && !provided.contains(&r) && !requirements.contains(&r) {
                requirements.push(r);
            }
        }
    }
    for r in &requirements {
        ensure!(
            root_satisfies(&root, r)?,
            "the rpm requires {r:?}, which a Debian host with the .deb's dependencies lacks"
        );
    }
    let stub = host_provides_rpm(scratch.path(), &requirements)?;
    let rpm = |args: &[&str], packages: &[&Path]| -> Result<String> {
        run(root
            .host
            .command("rpm")
            .arg("--root")
            .arg(&root.overlay.merged)
            .args(["--dbpath", "/var/lib/rpm"])
            .args(args)
            .args(packages))
    };
    rpm(&["--initdb"], &[])?;

    // Install, with the dependency check and the scriptlets.
    rpm(&["-i"], &[&stub, &p.agent_rpm, &p.zone_rpm, &p.ctl_rpm])?;
    for path in [
        "/usr/bin/weft-agent",
        "/usr/bin/weft-zone",
        "/usr/bin/weftctl",
        "/usr/lib/systemd/system/weft-agent.service",
        "/usr/lib/systemd/system/weft-zone.service",
        "/etc/weft/agent.yaml",
        "/etc/weft/zone.yaml",
        "/usr/lib/sysusers.d/weft-agent.conf",
    ] {
        ensure!(root.exists(path), "{path} is not installed");
    }
    check_weft_user(&root)?;
    let calls = root.take_systemctl_calls()?;
    started_nothing(&calls)?;
    ensure!(
        calls.iter().any(|c| c == "enable weft-agent.service"),
        "the agent was not enabled: {calls:?}"
    );
    ensure!(
        root.exists("/etc/systemd/system/multi-user.target.wants/weft-agent.service"),
        "weft-agent is not enabled"
    );
    ensure!(!root.exists("/etc/systemd/system/multi-user.target.wants/weft-zone.service"));
    root.sh("weft-agent --version && weft-zone --version && weftctl --version")?;

    // Reinstall as an upgrade (%post sees 2): the edit is kept
    // (%config(noreplace)), a running agent is restarted, not re-enabled.
    root.sh(FILL_AGENT_CONFIG)?;
    let edited = root.read("/etc/weft/agent.yaml")?;
    rpm(&["-U", "--replacepkgs"], &[&p.agent_rpm])?;
    ensure!(
        root.read("/etc/weft/agent.yaml")? == edited,
        "the upgrade lost the edit"
    );
    let calls = root.take_systemctl_calls()?;
    ensure!(
        calls.iter().any(|c| c == "reload weft-agent.service"),
        "the upgrade did not hand the running agent over to its new binary: {calls:?}"
    );
    ensure!(
        !calls
            .iter()
            .any(|c| c.starts_with("enable") || c.starts_with("stop") || c.starts_with("restart")),
        "{calls:?}"
    );

    // Erase: stopped, capture rules gone, files gone; the edited config is
    // kept as .rpmsave, and the user and state stay (rpm has no purge).
    root.sh("nft add table inet weft && install -d -o weft -g weft /var/lib/weft/agent")?;
    rpm(
        &["-e"],
        &[
            Path::new("weft-agent"),
            Path::new("weft-zone"),
            Path::new("weftctl"),
        ],
    )?;
    ensure!(
        !root.nft_tables()?.contains("inet weft"),
        "the capture table outlived the package"
    );
    let calls = root.take_systemctl_calls()?;
    for wanted in ["stop weft-agent.service", "stop weft-zone.service"] {
        ensure!(calls.iter().any(|c| c == wanted), "no {wanted}: {calls:?}");
    }
    for gone in [
        "/usr/bin/weft-agent",
        "/usr/bin/weft-zone",
        "/usr/bin/weftctl",
        "/usr/lib/systemd/system/weft-agent.service",
        "/etc/weft/zone.yaml",
    ] {
        ensure!(!root.exists(gone), "{gone} outlived the erase");
    }
    ensure!(root.read("/etc/weft/agent.yaml.rpmsave")? == edited);
    ensure!(
        !root.exists("/etc/systemd/system/multi-user.target.wants/weft-agent.service"),
        "the erased agent is still enabled"
    );
    ensure!(root.exists("/var/lib/weft/agent"));
    check_weft_user(&root)?;
    let left = rpm(&["-qa"], &[])?;
    ensure!(
        left.trim().starts_with("debian-host-provides") && left.lines().count() == 1,
        "rpm still knows: {left}"
    );
    Ok(())
}
