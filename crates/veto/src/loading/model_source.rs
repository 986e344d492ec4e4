//! Where a model's files come from: what the user passed as `--model`.
//!
//! * An existing folder is a diffusers model folder; it must hold `model_index.json`.
//! * Otherwise an `owner/name` string is a Hugging Face repo id. Files are looked up in the
//!   local Hugging Face cache first (the same layout `huggingface-cli download` and the Python
//!   libraries use, so models downloaded by either are found), and downloaded only when the
//!   cache lacks them and we are not offline.
//!
//! Callers ask for files by path relative to the model root (`transformer/config.json`,
//! shards named by an index json, …) with [`ModelSource::file`], so only the components a
//! pipeline actually needs are ever downloaded.
//!
//! Environment variables are read in one place, [`HubOptions::from_env`]; everything else takes
//! explicit [`HubOptions`], which keeps tests independent of the process environment.

use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::{Component as PathComponent, Path, PathBuf};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};

use super::lora::LoraSpec;
use super::model_index::ModelIndex;
use super::single_file::{is_single_file, SingleFile};
use super::weights::ComponentWeights;
use crate::error::{Error, Result};

/// The public Hugging Face hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The file that marks a diffusers pipeline folder.
pub const MODEL_INDEX: &str = "model_index.json";
/// How long the pre-download reachability check may take.
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the Hugging Face hub and its local cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache folder itself (the one holding `models--owner--name`), e.g.
    /// `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    /// Never touch the network; files must already be in the cache.
    pub offline: bool,
    /// Hub URL, without a trailing slash.
    pub endpoint: String,
    /// Access token, needed for gated repos such as FLUX.1-dev.
    pub token: Option<String>,
    /// Branch, tag or commit to read.
    pub revision: String,
    /// Show download progress bars.
    pub progress: bool,
    /// Before the first download, check within this time that the endpoint accepts a TCP
    /// connection. The HTTP client has no timeouts of its own, so without this a machine
    /// whose packets are silently dropped would wait minutes for the OS to give up. `None`
    /// skips the check (done when a proxy is configured, since the client goes through it).
    pub connect_timeout: Option<Duration>,
}

impl HubOptions {
    /// Online options using `cache_dir` as the hub cache, public endpoint, no token.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        Self {
            cache_dir: cache_dir.into(),
            offline: false,
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            revision: "main".to_string(),
            progress: true,
            connect_timeout: Some(DEFAULT_CONNECT_TIMEOUT),
        }
    }

    /// Cache-only options: nothing is ever downloaded.
    pub fn offline(cache_dir: impl Into<PathBuf>) -> Self {
        Self { offline: true, ..Self::new(cache_dir) }
    }

    /// The options the Python `huggingface_hub` library would use in this environment:
    /// `HF_HUB_CACHE` (or legacy `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; `HF_HUB_OFFLINE`
    /// (1/true/yes/on); `HF_ENDPOINT`; `HF_TOKEN` or the token file written by
    /// `huggingface-cli login`.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`HubOptions::from_env`] with the variables supplied by `var` (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let home = var("HOME").or_else(|| var("USERPROFILE")).map(PathBuf::from);
        let hf_home = var("HF_HOME").map(PathBuf::from).or_else(|| {
            var("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| home.map(|h| h.join(".cache")))
                .map(|c| c.join("huggingface"))
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .or_else(|| hf_home.as_ref().map(|h| h.join("hub")))
            .ok_or_else(|| {
                Error::Hub(
                    "cannot locate the Hugging Face cache: no home folder; set HF_HOME or HF_HUB_CACHE".to_string(),
                )
            })?;

        let mut options = Self::new(cache_dir);
        options.offline = var("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v));
        if let Some(endpoint) = var("HF_ENDPOINT") {
            options.endpoint = endpoint.trim().trim_end_matches('/').to_string();
        }
        options.token = var("HF_TOKEN").or_else(|| var("HUGGING_FACE_HUB_TOKEN")).or_else(|| {
            let path = var("HF_TOKEN_PATH").map(PathBuf::from).or_else(|| hf_home.as_ref().map(|h| h.join("token")))?;
            let token = std::fs::read_to_string(path).ok()?;
            let token = token.trim();
            (!token.is_empty()).then(|| token.to_string())
        });
        let proxied = ["ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"]
            .iter()
            .any(|name| var(name).is_some());
        if proxied {
            options.connect_timeout = None;
        }
        Ok(options)
    }
}

/// huggingface_hub's notion of a true environment flag.
fn is_truthy(value: &str) -> bool {
    matches!(value.trim().to_ascii_uppercase().as_str(), "1" | "ON" | "YES" | "TRUE")
}

/// A resolved model: a local folder or a hub repo read through the cache.
#[derive(Debug)]
pub struct ModelSource {
    inner: Inner,
    /// Components whose weights come from a file of their own (`--transformer x.gguf`).
    component_files: Vec<(String, PathBuf)>,
    /// LoRAs merged into the components' weights as they load.
    loras: Vec<LoraSpec>,
}

#[derive(Debug)]
enum Inner {
    Local(PathBuf),
    Hub(Box<HubSource>),
    /// A single-file checkpoint over a base model that provides the rest.
    SingleFile(Box<SingleFileSource>),
}

#[derive(Debug)]
struct SingleFileSource {
    file: SingleFile,
    base: ModelSource,
}

#[derive(Debug)]
struct HubSource {
    repo_id: String,
    options: HubOptions,
    /// `None` when offline: no client is ever built, so nothing can reach the network.
    api: Option<Api>,
    /// Outcome of the one reachability check, shared by all downloads of this source.
    reachable: OnceLock<std::result::Result<(), String>>,
}

impl ModelSource {
    /// Resolves `--model` with hub options taken from the environment
    /// ([`HubOptions::from_env`]).
    pub fn resolve(model: &str) -> Result<Self> {
        Self::resolve_with_base(model, None)
    }

    /// Resolves `--model` and `--base-model` (hub options from the environment). A
    /// single-file checkpoint takes its configs, scheduler, tokenizers and missing components
    /// from `base`, by default the official repo of the variant its tensors say; a base is
    /// refused for a diffusers folder or repo, which has all of these itself.
    pub fn resolve_with_base(model: &str, base: Option<&str>) -> Result<Self> {
        let path = Path::new(model);
        if base.is_none() && path.exists() && !is_single_file(path) {
            return Self::local(model);
        }
        if !path.exists() && !is_hub_repo_id(model) {
            return Err(not_found(model));
        }
        Self::resolve_with_base_and(model, base, &HubOptions::from_env()?)
    }

    /// [`ModelSource::resolve_with_base`] with explicit hub options.
    pub fn resolve_with_base_and(model: &str, base: Option<&str>, options: &HubOptions) -> Result<Self> {
        let path = Path::new(model);
        if !is_single_file(path) {
            if let Some(base) = base {
                return Err(Error::InvalidInput(format!(
                    "a base model (--base-model {base}) only applies to a single-file checkpoint (.safetensors); {model} is a \
                     diffusers model with its own configs and components"
                )));
            }
            return Self::resolve_with(model, options);
        }
        let file = SingleFile::open(path)?;
        let base = Self::resolve_with(base.unwrap_or(file.detected().default_base), options)?;
        Self::single_file(file, base)
    }

    /// A single-file checkpoint over `base`, checked against the base's configs.
    pub fn single_file(file: SingleFile, base: ModelSource) -> Result<Self> {
        if matches!(base.inner, Inner::SingleFile(_)) {
            return Err(Error::invalid("the base model of a single-file checkpoint must be a diffusers model"));
        }
        file.check_base(&base)?;
        Ok(Self {
            inner: Inner::SingleFile(Box::new(SingleFileSource { file, base })),
            component_files: Vec::new(),
            loras: Vec::new(),
        })
    }

    /// Resolves `--model` with explicit hub options: an existing path is a local folder, an
    /// `owner/name` string a hub repo, anything else an error.
    pub fn resolve_with(model: &str, options: &HubOptions) -> Result<Self> {
        if is_single_file(Path::new(model)) {
            Self::resolve_with_base_and(model, None, options)
        } else if Path::new(model).exists() {
            Self::local(model)
        } else if is_hub_repo_id(model) {
            Self::hub(model, options.clone())
        } else {
            Err(not_found(model))
        }
    }

    /// A local diffusers folder; it must contain `model_index.json`.
    pub fn local(folder: impl AsRef<Path>) -> Result<Self> {
        let folder = folder.as_ref();
        if !folder.exists() {
            return Err(Error::MissingFile {
                what: "model folder not found".to_string(),
                path: folder.display().to_string(),
            });
        }
        if !folder.is_dir() {
            return Err(Error::InvalidInput(format!(
                "model {} is a file, not a diffusers model folder",
                folder.display()
            )));
        }
        let index = folder.join(MODEL_INDEX);
        if !index.is_file() {
            return Err(Error::MissingFile {
                what: format!("{} is not a diffusers model folder, missing file", folder.display()),
                path: index.display().to_string(),
            });
        }
        Ok(Self { inner: Inner::Local(folder.to_path_buf()), component_files: Vec::new(), loras: Vec::new() })
    }

    /// A hub repo read through the cache in `options`. Fetches `model_index.json` right away
    /// so that an unknown, unreachable or uncached repo is reported before any work starts.
    pub fn hub(repo_id: &str, options: HubOptions) -> Result<Self> {
        if !is_hub_repo_id(repo_id) {
            return Err(Error::InvalidInput(format!(
                "{repo_id:?} is not a Hugging Face repo id (expected owner/name)"
            )));
        }
        let api = if options.offline {
            None
        } else {
            let api = ApiBuilder::from_cache(Cache::new(options.cache_dir.clone()))
                .with_endpoint(options.endpoint.clone())
                .with_token(options.token.clone())
                .with_progress(options.progress)
                .build()
                .map_err(|e| Error::Hub(format!("cannot set up the Hugging Face client: {e}")))?;
            Some(api)
        };
        let hub = HubSource { repo_id: repo_id.to_string(), options, api, reachable: OnceLock::new() };
        hub.file(MODEL_INDEX)?;
        Ok(Self { inner: Inner::Hub(Box::new(hub)), component_files: Vec::new(), loras: Vec::new() })
    }

    /// The local path of a file, by path relative to the model root (`/`-separated). Local
    /// folders: the file must exist. Hub repos: the cache, else a download (unless offline).
    pub fn file(&self, rel: &str) -> Result<PathBuf> {
        let rel_path = check_rel(rel)?;
        match &self.inner {
            Inner::Local(root) => {
                let path = root.join(rel_path);
                if path.is_file() {
                    Ok(path)
                } else {
                    Err(Error::MissingFile {
                        what: format!("model folder {} has no {rel}", root.display()),
                        path: path.display().to_string(),
                    })
                }
            }
            Inner::Hub(hub) => hub.file(rel),
            Inner::SingleFile(single) => single.base.file(rel),
        }
    }

    /// Like [`ModelSource::file`] for files that may legitimately be absent (single-file vs
    /// sharded weights): `Ok(None)` when the folder lacks it, the hub answers 404, or — offline
    /// — the cache lacks it (then the caller's "not found" should suggest downloading).
    pub fn try_file(&self, rel: &str) -> Result<Option<PathBuf>> {
        let rel_path = check_rel(rel)?;
        match &self.inner {
            Inner::Local(root) => {
                let path = root.join(rel_path);
                Ok(path.is_file().then_some(path))
            }
            Inner::Hub(hub) => {
                if let Some(path) = hub.cached(rel) {
                    return Ok(Some(path));
                }
                if hub.options.offline {
                    return Ok(None);
                }
                match hub.download(rel) {
                    Ok(path) => Ok(Some(path)),
                    Err(DownloadError::NotFound) => Ok(None),
                    Err(e) => Err(hub.download_error(rel, e)),
                }
            }
            Inner::SingleFile(single) => single.base.try_file(rel),
        }
    }

    /// [`ModelSource::file`] for several files, in order.
    pub fn files<S: AsRef<str>>(&self, rels: &[S]) -> Result<Vec<PathBuf>> {
        rels.iter().map(|rel| self.file(rel.as_ref())).collect()
    }

    /// Reads and validates `model_index.json`.
    pub fn model_index(&self) -> Result<ModelIndex> {
        ModelIndex::from_file(self.file(MODEL_INDEX)?)
    }

    /// The folder for local models. `None` for hub repos: their files can live in different
    /// snapshot folders of the cache, so always go through [`ModelSource::file`].
    pub fn root(&self) -> Option<&Path> {
        match &self.inner {
            Inner::Local(root) => Some(root),
            Inner::Hub(_) | Inner::SingleFile(_) => None,
        }
    }

    /// Where a component of the model lives, for error messages: its folder for local
    /// models, `owner/name/component` for hub repos.
    pub fn describe(&self, component: &str) -> String {
        if let Inner::SingleFile(single) = &self.inner {
            return match single.file.part(component) {
                Some((part, _)) => format!("{} ({component}, {})", single.file.path().display(), part.layout),
                None => single.base.describe(component),
            };
        }
        match (self.root(), self.repo_id()) {
            (Some(root), _) => root.join(component).display().to_string(),
            (None, Some(repo)) => format!("{repo}/{component}"),
            _ => component.to_string(),
        }
    }

    /// Take `component`'s weights from `file` (a GGUF file, e.g. city96's quantized
    /// transformers) instead of the model's own; its config still comes from the model.
    pub fn with_component_file(mut self, component: &str, file: impl Into<PathBuf>) -> Result<Self> {
        let file = file.into();
        if !file.is_file() {
            return Err(Error::MissingFile {
                what: format!("{component} weights file not found"),
                path: file.display().to_string(),
            });
        }
        self.component_files.retain(|(c, _)| c != component);
        self.component_files.push((component.to_string(), file));
        Ok(self)
    }

    /// The file `component`'s weights come from when it was replaced.
    pub fn component_file(&self, component: &str) -> Option<&Path> {
        self.component_files.iter().find(|(c, _)| c == component).map(|(_, f)| f.as_path())
    }

    /// The repo id for hub models.
    pub fn repo_id(&self) -> Option<&str> {
        match &self.inner {
            Inner::Local(_) => None,
            Inner::Hub(hub) => Some(&hub.repo_id),
            Inner::SingleFile(single) => single.base.repo_id(),
        }
    }

    /// A single-file checkpoint's weights for `component`, configured by the base's config;
    /// `None` for diffusers models and components the file lacks.
    pub fn single_file_weights(&self, component: &str) -> Result<Option<ComponentWeights>> {
        let Inner::SingleFile(single) = &self.inner else { return Ok(None) };
        if single.file.part(component).is_none() {
            return Ok(None);
        }
        let config = single.base.file(&format!("{component}/config.json"))?;
        Ok(single.file.weights(component, config))
    }

    /// The single-file checkpoint, if that is what this is.
    pub fn single_file_checkpoint(&self) -> Option<&SingleFile> {
        match &self.inner {
            Inner::SingleFile(single) => Some(&single.file),
            _ => None,
        }
    }

    /// For a single-file checkpoint, what comes from where (`transformer: x.safetensors (BFL
    /// layout, FLUX.1-dev); model_index.json, configs, scheduler, …: black-forest-labs/FLUX.1-dev`);
    /// `None` for a diffusers model.
    pub fn parts_summary(&self) -> Option<String> {
        match &self.inner {
            Inner::SingleFile(single) => Some(single.file.summary(&single.base)),
            _ => None,
        }
    }

    /// This source with `loras` merged into its weights as each component loads, in order
    /// (see [`crate::loading::lora`]).
    pub fn with_loras(mut self, loras: Vec<LoraSpec>) -> Self {
        self.loras = loras;
        self
    }

    /// The LoRAs merged into this source's weights.
    pub fn loras(&self) -> &[LoraSpec] {
        &self.loras
    }
}

impl fmt::Display for ModelSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.inner {
            Inner::Local(root) => write!(f, "model folder {}", root.display()),
            Inner::Hub(hub) => write!(f, "Hugging Face repo {}", hub.repo_id),
            Inner::SingleFile(single) => {
                write!(f, "single-file checkpoint {} over {}", single.file.path().display(), single.base)
            }
        }
    }
}

/// Why a download failed, split so that `try_file` can treat 404 as "absent".
enum DownloadError {
    NotFound,
    Refused(u16),
    Unreachable(String),
    Other(String),
}

impl HubSource {
    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.options.revision.clone())
    }

    fn file(&self, rel: &str) -> Result<PathBuf> {
        if let Some(path) = self.cached(rel) {
            return Ok(path);
        }
        if self.options.offline {
            return Err(Error::Hub(format!(
                "{repo}: {rel} is not in the Hugging Face cache ({cache}) and offline mode \
                 (HF_HUB_OFFLINE) is on. Download the model first (`huggingface-cli download \
                 {repo}`), pass a local model folder, or set HF_HOME / HF_HUB_CACHE to the cache \
                 that has it",
                repo = self.repo_id,
                cache = self.options.cache_dir.display(),
            )));
        }
        self.download(rel).map_err(|e| self.download_error(rel, e))
    }

    /// The file's path in the cache snapshot the revision points at, if it is there.
    fn cached(&self, rel: &str) -> Option<PathBuf> {
        let cache_repo = Cache::new(self.options.cache_dir.clone()).repo(self.repo());
        if let Some(path) = cache_repo.get(rel) {
            return path.is_file().then_some(path);
        }
        // hf-hub reads `refs/<revision>` verbatim, so a ref written with a trailing newline
        // is missed, and a revision given as a commit hash has no ref file at all.
        let revision = &self.options.revision;
        let ref_file = self.options.cache_dir.join(self.repo().folder_name()).join("refs").join(revision);
        let commit = match std::fs::read_to_string(ref_file) {
            Ok(text) => text.trim().to_string(),
            Err(_) if is_commit_hash(revision) => revision.clone(),
            Err(_) => return None,
        };
        if commit.is_empty() {
            return None;
        }
        let path = cache_repo.pointer_path(&commit).join(rel);
        path.is_file().then_some(path)
    }

    fn download(&self, rel: &str) -> std::result::Result<PathBuf, DownloadError> {
        if let Some(timeout) = self.options.connect_timeout {
            self.reachable
                .get_or_init(|| probe(&self.options.endpoint, timeout))
                .clone()
                .map_err(DownloadError::Unreachable)?;
        }
        let api = self.api.as_ref().ok_or_else(|| DownloadError::Other("offline".to_string()))?;
        api.repo(self.repo()).download(rel).map_err(|e| match http_status(&e) {
            Some(404) => DownloadError::NotFound,
            Some(code @ (401 | 403)) => DownloadError::Refused(code),
            _ => DownloadError::Other(e.to_string()),
        })
    }

    fn download_error(&self, rel: &str, err: DownloadError) -> Error {
        let repo = &self.repo_id;
        let endpoint = &self.options.endpoint;
        let msg = match err {
            DownloadError::NotFound => {
                format!("{repo} has no file {rel} at revision {} (HTTP 404 from {endpoint})", self.options.revision)
            }
            DownloadError::Refused(code) => format!(
                "{endpoint} refused {rel} of {repo} (HTTP {code}): the repo does not exist, or \
                 it is gated or private. Check the id; for a gated model accept its license at \
                 {endpoint}/{repo} and set HF_TOKEN (or run `huggingface-cli login`)"
            ),
            DownloadError::Unreachable(why) => format!(
                "cannot reach {endpoint} to download {rel} of {repo}: {why}. Without network, \
                 pass a local model folder, or download the model elsewhere \
                 (`huggingface-cli download {repo}`) and point HF_HOME / HF_HUB_CACHE at that \
                 cache; set HF_HUB_OFFLINE=1 to never try the network"
            ),
            DownloadError::Other(why) => format!(
                "downloading {rel} of {repo} from {endpoint} failed: {why}. Pass a local model \
                 folder, or set HF_HUB_OFFLINE=1 to use only the local cache ({})",
                self.options.cache_dir.display()
            ),
        };
        Error::Hub(msg)
    }
}

/// The HTTP status behind an hf-hub error, if the server answered. hf-hub wraps the HTTP
/// client's error, whose status variant displays as `http status: <code>`; reading the text
/// spares a direct dependency on the client crate just to match one variant.
fn http_status(err: &ApiError) -> Option<u16> {
    match err {
        ApiError::RequestError(inner) => {
            let text = inner.to_string();
            let code = text.strip_prefix("http status: ")?;
            code.trim().parse().ok()
        }
        ApiError::TooManyRetries(inner) => http_status(inner),
        _ => None,
    }
}

/// Can a TCP connection to the endpoint be opened within `timeout`? Name resolution runs on
/// a helper thread because the system resolver has no timeout; if it hangs, the thread is
/// left behind and we report the timeout.
fn probe(endpoint: &str, timeout: Duration) -> std::result::Result<(), String> {
    let (host, port) = endpoint_host_port(endpoint)?;
    let start = Instant::now();
    let (tx, rx) = mpsc::channel();
    let lookup_host = host.clone();
    std::thread::spawn(move || {
        let addrs = (lookup_host.as_str(), port).to_socket_addrs().map(|a| a.collect::<Vec<_>>());
        let _ = tx.send(addrs);
    });
    let addrs = match rx.recv_timeout(timeout) {
        Ok(Ok(addrs)) if !addrs.is_empty() => addrs,
        Ok(Ok(_)) => return Err(format!("{host} resolves to no address")),
        Ok(Err(e)) => return Err(format!("cannot resolve {host} ({e})")),
        Err(_) => return Err(format!("resolving {host} took more than {}s", timeout.as_secs_f32())),
    };
    let mut last = String::from("timed out");
    for addr in addrs {
        let left = timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(_) => return Ok(()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!("cannot connect to {host}:{port} ({last})"))
}

/// `https://host[:port][/path]` → `(host, port)`.
fn endpoint_host_port(endpoint: &str) -> std::result::Result<(String, u16), String> {
    let (rest, default_port) = if let Some(rest) = endpoint.strip_prefix("https://") {
        (rest, 443)
    } else if let Some(rest) = endpoint.strip_prefix("http://") {
        (rest, 80)
    } else {
        return Err(format!("endpoint {endpoint:?} is not an http(s) URL"));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let authority = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            let port = port.parse().map_err(|_| format!("bad port in endpoint {endpoint:?}"))?;
            (host, port)
        }
        _ => (authority, default_port),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("endpoint {endpoint:?} has no host"));
    }
    Ok((host.to_string(), port))
}

/// `owner/name` as the hub accepts it: letters, digits, `-`, `_`, `.`; no `--` or `..`;
/// parts neither start nor end with `-` or `.`; at most 96 characters.
pub fn is_hub_repo_id(s: &str) -> bool {
    let Some((owner, name)) = s.split_once('/') else {
        return false;
    };
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
    };
    s.len() <= 96 && part_ok(owner) && part_ok(name) && !s.contains("--") && !s.contains("..")
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Paths asked of a model must stay inside it: relative, plain components only.
fn check_rel(rel: &str) -> Result<&Path> {
    let path = Path::new(rel);
    let plain =
        !rel.is_empty() && !rel.contains('\\') && path.components().all(|c| matches!(c, PathComponent::Normal(_)));
    if plain {
        Ok(path)
    } else {
        Err(Error::InvalidInput(format!(
            "model file {rel:?} must be a relative path inside the model (no '..', '.', or leading '/')"
        )))
    }
}

fn not_found(model: &str) -> Error {
    Error::InvalidInput(format!("model not found: {model:?} (not a folder and not a Hugging Face repo id)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::fs;

    const INDEX: &str = r#"{"_class_name": "FluxPipeline",
        "transformer": ["diffusers", "FluxTransformer2DModel"]}"#;

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    /// A model folder with an index and one component config.
    fn local_model() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join(MODEL_INDEX), INDEX);
        write(&dir.path().join("transformer/config.json"), "{}");
        dir
    }

    /// Hub cache layout: `models--owner--name/{refs/main, snapshots/<rev>/...}`.
    fn fake_cache(ref_text: &str) -> (tempfile::TempDir, PathBuf) {
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--acme--flux-mini");
        let rev = "0123456789abcdef0123456789abcdef01234567";
        write(&repo.join("refs/main"), ref_text);
        let snap = repo.join("snapshots").join(rev);
        write(&snap.join(MODEL_INDEX), INDEX);
        write(&snap.join("transformer/config.json"), "{}");
        (cache, snap)
    }

    fn offline(dir: &Path) -> HubOptions {
        HubOptions::offline(dir)
    }

    #[test]
    fn local_folder_resolves_and_serves_files() {
        let dir = local_model();
        let model = dir.path().to_str().unwrap();
        let empty = tempfile::tempdir().unwrap();
        let src = ModelSource::resolve_with(model, &offline(empty.path())).unwrap();
        assert_eq!(src.root(), Some(dir.path()));
        assert_eq!(src.repo_id(), None);
        assert_eq!(src.file("transformer/config.json").unwrap(), dir.path().join("transformer/config.json"));
        assert_eq!(src.files(&["model_index.json", "transformer/config.json"]).unwrap().len(), 2);
        assert_eq!(src.try_file("vae/config.json").unwrap(), None);
        let err = src.file("vae/config.json").unwrap_err().to_string();
        assert!(err.contains(model) && err.contains("vae/config.json"), "{err}");
        assert_eq!(src.model_index().unwrap().pipeline_class(), "FluxPipeline");
        assert!(src.to_string().contains(model));
    }

    #[test]
    fn relative_paths_must_stay_inside() {
        let dir = local_model();
        let src = ModelSource::local(dir.path()).unwrap();
        for rel in ["../x", "/etc/passwd", "", "a/../../b", "./model_index.json", "a\\b"] {
            let err = src.file(rel).unwrap_err().to_string();
            assert!(err.contains("relative path"), "{rel}: {err}");
        }
    }

    #[test]
    fn missing_folder_and_garbage_ids() {
        let empty = tempfile::tempdir().unwrap();
        let missing = empty.path().join("no/such/model");
        for model in [missing.to_str().unwrap(), "not a model!", "a/b/c", "", "-x/y", "x/y..z"] {
            let err = ModelSource::resolve_with(model, &offline(empty.path())).unwrap_err().to_string();
            assert!(err.contains("model not found"), "{model}: {err}");
            assert!(err.contains("not a folder and not a Hugging Face repo id"), "{err}");
            assert!(err.contains(model), "{err}");
        }
        // The env-reading entry point gives the same answer without looking at the hub.
        let err = ModelSource::resolve("surely not/a repo").unwrap_err().to_string();
        assert!(err.contains("model not found"), "{err}");
    }

    #[test]
    fn folder_without_model_index() {
        let dir = tempfile::tempdir().unwrap();
        write(&dir.path().join("transformer/config.json"), "{}");
        let err =
            ModelSource::resolve_with(dir.path().to_str().unwrap(), &offline(dir.path())).unwrap_err().to_string();
        assert!(err.contains(MODEL_INDEX), "{err}");
        assert!(err.contains(dir.path().to_str().unwrap()), "{err}");
    }

    #[test]
    fn a_file_is_not_a_model_folder() {
        let dir = local_model();
        let file = dir.path().join(MODEL_INDEX);
        let err = ModelSource::local(&file).unwrap_err().to_string();
        assert!(err.contains("is a file"), "{err}");
    }

    #[test]
    fn repo_id_syntax() {
        for ok in ["black-forest-labs/FLUX.1-schnell", "a/b", "A_b/c.d-e", "user123/model_v2"] {
            assert!(is_hub_repo_id(ok), "{ok}");
        }
        for bad in ["gpt2", "a/b/c", "/a", "a/", "a--b/c", "a/b..c", ".a/b", "a/b-", "a b/c", "~/m"] {
            assert!(!is_hub_repo_id(bad), "{bad}");
        }
        assert!(!is_hub_repo_id(&format!("a/{}", "x".repeat(100))));
    }

    #[test]
    fn offline_empty_cache_fails_fast_and_clearly() {
        let empty = tempfile::tempdir().unwrap();
        let start = Instant::now();
        let err = ModelSource::resolve_with("acme/flux-mini", &offline(empty.path())).unwrap_err().to_string();
        assert!(start.elapsed() < Duration::from_secs(2));
        for needle in ["acme/flux-mini", MODEL_INDEX, "HF_HUB_OFFLINE", "HF_HOME", "download"] {
            assert!(err.contains(needle), "missing {needle:?} in: {err}");
        }
        assert!(err.contains(empty.path().to_str().unwrap()), "{err}");
    }

    #[test]
    fn offline_cache_hit() {
        // Ref written exactly like huggingface_hub does, and with a trailing newline.
        for ref_text in ["0123456789abcdef0123456789abcdef01234567", "0123456789abcdef0123456789abcdef01234567\n"] {
            let (cache, snap) = fake_cache(ref_text);
            let src = ModelSource::resolve_with("acme/flux-mini", &offline(cache.path())).unwrap();
            assert_eq!(src.root(), None);
            assert_eq!(src.repo_id(), Some("acme/flux-mini"));
            assert_eq!(src.file("transformer/config.json").unwrap(), snap.join("transformer/config.json"));
            assert_eq!(src.model_index().unwrap().pipeline_class(), "FluxPipeline");
            assert_eq!(src.try_file("vae/config.json").unwrap(), None);
            let err = src.file("vae/config.json").unwrap_err().to_string();
            assert!(err.contains("vae/config.json") && err.contains("acme/flux-mini"), "{err}");
        }
    }

    #[test]
    fn cache_hit_by_commit_revision() {
        let (cache, snap) = fake_cache("ffffffffffffffffffffffffffffffffffffffff");
        let mut opts = offline(cache.path());
        opts.revision = "0123456789abcdef0123456789abcdef01234567".to_string();
        let src = ModelSource::resolve_with("acme/flux-mini", &opts).unwrap();
        assert_eq!(src.file(MODEL_INDEX).unwrap(), snap.join(MODEL_INDEX));
    }

    #[cfg(unix)]
    #[test]
    fn cache_with_blob_symlinks() {
        // Real caches hold blobs/<etag> and relative symlinks in the snapshot.
        let cache = tempfile::tempdir().unwrap();
        let repo = cache.path().join("models--acme--flux-mini");
        write(&repo.join("refs/main"), "abc");
        write(&repo.join("blobs/e1"), INDEX);
        fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
        std::os::unix::fs::symlink("../../blobs/e1", repo.join("snapshots/abc").join(MODEL_INDEX)).unwrap();
        // A dangling link (blob deleted) counts as missing.
        std::os::unix::fs::symlink("../../blobs/gone", repo.join("snapshots/abc/extra.json")).unwrap();
        let src = ModelSource::resolve_with("acme/flux-mini", &offline(cache.path())).unwrap();
        assert_eq!(fs::read_to_string(src.file(MODEL_INDEX).unwrap()).unwrap(), INDEX);
        assert!(src.file("extra.json").is_err());
    }

    #[test]
    fn online_uses_cache_without_network() {
        // Port 1 on loopback refuses connections: any network use would fail.
        let (cache, snap) = fake_cache("0123456789abcdef0123456789abcdef01234567");
        let mut opts = HubOptions::new(cache.path());
        opts.endpoint = "http://127.0.0.1:1".to_string();
        let src = ModelSource::resolve_with("acme/flux-mini", &opts).unwrap();
        assert_eq!(src.file("transformer/config.json").unwrap(), snap.join("transformer/config.json"));
    }

    #[test]
    fn unreachable_hub_fails_fast() {
        let empty = tempfile::tempdir().unwrap();
        // Refused connection, and an address nothing answers (TEST-NET-1) with a short timeout.
        for endpoint in ["http://127.0.0.1:1", "https://192.0.2.1"] {
            let mut opts = HubOptions::new(empty.path());
            opts.endpoint = endpoint.to_string();
            opts.connect_timeout = Some(Duration::from_millis(500));
            let start = Instant::now();
            let err = ModelSource::resolve_with("acme/flux-mini", &opts).unwrap_err().to_string();
            assert!(start.elapsed() < Duration::from_secs(5), "{endpoint} took {:?}", start.elapsed());
            assert!(err.contains("acme/flux-mini") && err.contains(MODEL_INDEX), "{err}");
            // Sandboxes may intercept connections to outside addresses and answer HTTP
            // themselves, so only the loopback case has a guaranteed kind of failure.
            if endpoint.contains("127.0.0.1") {
                assert!(err.contains("cannot reach") && err.contains("HF_HUB_OFFLINE"), "{err}");
            }
        }
    }

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn options_from_environment_variables() {
        let o = HubOptions::from_vars(vars(&[("HOME", "/home/u")])).unwrap();
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert!(!o.offline);
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        assert_eq!(o.revision, "main");
        assert!(o.connect_timeout.is_some());

        let o = HubOptions::from_vars(vars(&[("HOME", "/home/u"), ("XDG_CACHE_HOME", "/xdg")])).unwrap();
        assert_eq!(o.cache_dir, PathBuf::from("/xdg/huggingface/hub"));

        let o = HubOptions::from_vars(vars(&[("HOME", "/home/u"), ("HF_HOME", "/hf")])).unwrap();
        assert_eq!(o.cache_dir, PathBuf::from("/hf/hub"));

        let o = HubOptions::from_vars(vars(&[
            ("HF_HOME", "/hf"),
            ("HF_HUB_CACHE", "/cache"),
            ("HF_HUB_OFFLINE", "1"),
            ("HF_ENDPOINT", "https://mirror.example/"),
            ("HF_TOKEN", "hf_abc"),
            ("https_proxy", "http://proxy:3128"),
        ]))
        .unwrap();
        assert_eq!(o.cache_dir, PathBuf::from("/cache"));
        assert!(o.offline);
        assert_eq!(o.endpoint, "https://mirror.example");
        assert_eq!(o.token.as_deref(), Some("hf_abc"));
        assert_eq!(o.connect_timeout, None);

        for (v, want) in [("true", true), ("YES", true), ("on", true), ("0", false), ("no", false)] {
            let o = HubOptions::from_vars(vars(&[("HF_HOME", "/hf"), ("HF_HUB_OFFLINE", v)])).unwrap();
            assert_eq!(o.offline, want, "{v}");
        }

        let err = HubOptions::from_vars(vars(&[])).unwrap_err().to_string();
        assert!(err.contains("HF_HOME"), "{err}");
    }

    #[test]
    fn token_file_under_hf_home() {
        let home = tempfile::tempdir().unwrap();
        write(&home.path().join("token"), "hf_from_file\n");
        let o = HubOptions::from_vars(vars(&[("HF_HOME", home.path().to_str().unwrap())])).unwrap();
        assert_eq!(o.token.as_deref(), Some("hf_from_file"));
    }

    #[test]
    fn endpoint_parsing() {
        assert_eq!(endpoint_host_port("https://huggingface.co").unwrap(), ("huggingface.co".into(), 443));
        assert_eq!(endpoint_host_port("http://h:8080/x").unwrap(), ("h".into(), 8080));
        assert_eq!(endpoint_host_port("http://[::1]:9").unwrap(), ("::1".into(), 9));
        assert!(endpoint_host_port("ftp://h").is_err());
        assert!(endpoint_host_port("https://").is_err());
    }
}
