//! The tenancy policy: what a tenant's ModelPool (or a SwarmJob's own pool) may ask of
//! the cluster. The platform team sets it in the chart's `tenancy` values; the chart turns
//! the same values into a ValidatingAdmissionPolicy, so a bad manifest is refused at
//! `kubectl apply`, and the operator checks again here (defence in depth: a policy the
//! admission chain lost, or an object created before it existed).
//!
//! External endpoints are checked twice as well: the URL when the pool is reconciled, and
//! every address its host resolves to when a connection is made (`external_client`), so a
//! name that resolves to the cluster's own network, now or after a DNS change, is refused.
//!
//! Layer: a protocol around the API types; uses `api` only.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::dns::{Name, Resolve, Resolving};

use crate::api::ModelPoolSpec;

/// What tenants may ask for. `Policy::default()` is the chart's default: the safe one.
#[derive(Clone, Debug)]
pub struct Policy {
    /// Node path prefixes a `file:///` model source may name; none turns `file://` off.
    pub host_paths: Vec<String>,
    /// Worker images a pool may name besides the operator's own worker image; an entry
    /// ending in `*` allows every image that starts with the rest.
    pub worker_images: Vec<String>,
    /// Whether a pool that runs workers must name a Kueue queue (its tenant's quota).
    pub require_queue: bool,
    /// PriorityClasses a pool may name.
    pub priority_classes: Vec<String>,
    /// Where external endpoints may and may not be.
    pub external: External,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            host_paths: Vec::new(),
            worker_images: Vec::new(),
            require_queue: true,
            priority_classes: Vec::new(),
            external: External::default(),
        }
    }
}

/// Where `spec.external.url` may point. Private, loopback, link-local and cluster
/// addresses are refused unless allowed: the operator that calls them holds cluster-wide
/// rights and is trusted by every worker's NetworkPolicy.
#[derive(Clone, Debug, Default)]
pub struct External {
    /// Hosts (`name`, or `*.suffix` for every name under it) and networks (CIDR or one
    /// address) external endpoints may be at although the rules below refuse them.
    pub allow: Vec<Allowed>,
    /// Networks refused besides the built-in ones: a cluster whose pod or service range
    /// is not a private range names it here.
    pub deny: Vec<IpNet>,
}

/// One entry of `External::allow`.
#[derive(Clone, Debug, PartialEq)]
pub enum Allowed {
    Host(String),
    Suffix(String),
    Net(IpNet),
}

impl std::str::FromStr for Allowed {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Allowed::Net(net));
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Allowed::Net(IpNet::from(ip)));
        }
        let name = s.to_ascii_lowercase();
        let valid = |n: &str| {
            !n.is_empty()
                && n.split('.').all(|l| {
                    !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                })
        };
        match name.strip_prefix("*.") {
            Some(suffix) if valid(suffix) => Ok(Allowed::Suffix(suffix.to_owned())),
            None if valid(&name) => Ok(Allowed::Host(name)),
            _ => Err(format!(
                "{s}: expected a host name, *.domain, an IP address or a CIDR"
            )),
        }
    }
}

/// Networks no external endpoint may be in unless allowed: this host, private networks
/// (where cluster pod and service ranges live), carrier-grade NAT, link-local (cloud
/// metadata at 169.254.169.254), multicast and reserved ranges, and the NAT64 prefixes,
/// whose addresses embed an IPv4 one (a DNS64 resolver's answer for a private host). An
/// IPv6-only cluster that reaches public endpoints through NAT64 allows its prefix.
pub const DENIED: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/3",
    "::/128",
    "::1/128",
    "64:ff9b::/96",
    "64:ff9b:1::/48",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
];

/// Name suffixes of in-cluster services, and of this host. The chart's admission policy
/// holds the same lists; a chart test keeps them equal.
pub const CLUSTER_SUFFIXES: &[&str] = &["svc", "cluster.local", "localhost", "internal"];

impl External {
    fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.allow.iter().any(|a| match a {
            Allowed::Host(h) => *h == host,
            Allowed::Suffix(s) => host.ends_with(&format!(".{s}")),
            Allowed::Net(_) => false,
        })
    }

    /// Why an endpoint may not be at `ip`, if it may not.
    pub fn refuses(&self, ip: IpAddr) -> Option<String> {
        // An IPv4 address written as IPv6 reaches the same host.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self
            .allow
            .iter()
            .any(|a| matches!(a, Allowed::Net(n) if n.contains(&ip)))
        {
            return None;
        }
        let builtin = DENIED.iter().map(|n| n.parse::<IpNet>().expect("a CIDR"));
        builtin
            .chain(self.deny.iter().copied())
            .find(|net| net.contains(&ip))
            .map(|net| format!("{ip} is in {net}"))
    }

    /// Checks an external pool's URL before anything connects to it.
    pub fn check_url(&self, url: &str) -> Result<(), Denied> {
        let deny = |why: String| Denied {
            field: "spec.external.url",
            message: why,
        };
        let parsed =
            reqwest::Url::parse(url).map_err(|e| deny(format!("{url:?} is not a URL: {e}")))?;
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(deny(
                "the URL holds credentials, which would show in the pool's status and Events: remove them".to_owned(),
            ));
        }
        let allow_hint = "ask the platform team to add it to the Helm value tenancy.external.allow";
        let Some(host) = parsed.host_str() else {
            return Err(deny(format!("{url:?} has no host")));
        };
        // The URL parser has normalised IPv4 literals (0x7f.1, 2130706433) already.
        match host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            Ok(ip) => self.check_ip(ip, allow_hint),
            Err(_) => {
                // A fully qualified name ends in a dot, but allow entries and the
                // admission policy compare names without one: refused, rather than match
                // one check and not the other.
                if host.ends_with('.') {
                    return Err(deny(format!(
                        "{host} ends with a dot: write the host name without it"
                    )));
                }
                if self.allows_host(host) {
                    return Ok(());
                }
                let name = host.to_ascii_lowercase();
                let in_cluster = !name.contains('.')
                    || CLUSTER_SUFFIXES
                        .iter()
                        .any(|s| name == *s || name.ends_with(&format!(".{s}")));
                if in_cluster {
                    return Err(deny(format!(
                        "{name} names a service inside the cluster or this host, which external pools may not reach: {allow_hint}"
                    )));
                }
                Ok(())
            }
        }
    }

    fn check_ip(&self, ip: IpAddr, hint: &str) -> Result<(), Denied> {
        match self.refuses(ip) {
            None => Ok(()),
            Some(why) => Err(Denied {
                field: "spec.external.url",
                message: format!(
                    "{why}, a private, loopback or link-local network that external pools may not reach: {hint}"
                ),
            }),
        }
    }
}

/// One thing a pool asks for that the policy refuses: the field, and why with the fix.
#[derive(Clone, Debug, PartialEq)]
pub struct Denied {
    pub field: &'static str,
    pub message: String,
}

impl std::fmt::Display for Denied {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

impl Policy {
    /// Everything `spec` asks for that the policy refuses; `worker_image` is the
    /// operator's own, always allowed.
    pub fn check(&self, spec: &ModelPoolSpec, worker_image: &str) -> Vec<Denied> {
        let mut denied = Vec::new();
        if let Some(external) = &spec.external {
            denied.extend(self.external.check_url(&external.url).err());
            // An external pool runs no pods: the rest does not apply.
            return denied;
        }
        if let Some(path) = spec
            .model
            .as_ref()
            .and_then(|m| m.source.strip_prefix("file://"))
        {
            denied.extend(self.host_path(path).err());
        }
        if let Some(image) = spec.template.as_ref().and_then(|t| t.image.as_deref()) {
            let allowed = image == worker_image
                || self
                    .worker_images
                    .iter()
                    .any(|a| match a.strip_suffix('*') {
                        Some(prefix) => image.starts_with(prefix),
                        None => a == image,
                    });
            if !allowed {
                denied.push(Denied {
                    field: "spec.template.image",
                    message: format!(
                        "{image} is not an allowed worker image: leave it out to run {worker_image}, or ask the platform team to add it to the Helm value tenancy.workerImages"
                    ),
                });
            }
        }
        if self.require_queue && spec.queue_name.is_none() {
            denied.push(Denied {
                field: "spec.queueName",
                message: "a pool that runs workers must name its namespace's Kueue LocalQueue, which holds its GPU quota (the Helm value tenancy.requireQueue=false lifts this on clusters without Kueue)".to_owned(),
            });
        }
        if let Some(class) = &spec.priority_class_name
            && !self.priority_classes.contains(class)
        {
            denied.push(Denied {
                field: "spec.priorityClassName",
                message: format!(
                    "PriorityClass {class} is not one pools may use ({}): leave it out, or ask the platform team to add it to the Helm value tenancy.priorityClasses",
                    listed(&self.priority_classes)
                ),
            });
        }
        denied
    }

    /// A `file:///` path is allowed when what it mounts lies under an allowed prefix,
    /// whole segments only, and it has no `.` or `..` segment that could climb out. A
    /// path to a `.gguf` file mounts the file's folder, so that folder is what is checked.
    fn host_path(&self, path: &str) -> Result<(), Denied> {
        let deny = |message: String| Denied {
            field: "spec.model.source",
            message,
        };
        if self.host_paths.is_empty() {
            return Err(deny(format!(
                "file://{path} mounts a node path, and this cluster allows none: put the weights in a PersistentVolumeClaim (pvc://claim/path), or ask the platform team to list a prefix in the Helm value tenancy.hostPaths"
            )));
        }
        // One trailing slash names the same folder.
        let trimmed = match path.strip_suffix('/') {
            Some(rest) if !rest.is_empty() => rest,
            _ => path,
        };
        let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
        if !path.starts_with('/') || segments.iter().any(|s| matches!(*s, "" | "." | "..")) {
            return Err(deny(format!(
                "file://{path} is not a plain absolute path (no empty, . or .. segments)"
            )));
        }
        let mounted = match segments.split_last() {
            Some((file, folder)) if file.ends_with(".gguf") => folder,
            _ => &segments[..],
        };
        let under = |prefix: &str| {
            let prefix: Vec<&str> = prefix
                .trim_end_matches('/')
                .split('/')
                .skip(1)
                .filter(|s| !s.is_empty())
                .collect();
            mounted.len() >= prefix.len() && mounted[..prefix.len()] == prefix[..]
        };

        if self.host_paths.iter().any(|p| under(p)) {
            Ok(())
        } else {
            Err(deny(format!(
                "file://{path} is outside the node paths pools may mount ({}): ask the platform team to add its prefix to the Helm value tenancy.hostPaths",
                listed(&self.host_paths)
            )))
        }
    }
}

fn listed(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

/// The HTTP client for external endpoints: no redirects (a redirect is an SSRF
/// to wherever it points), no proxy from the environment, and a resolver that drops every
/// address the policy refuses. A URL whose host is an IP literal is not resolved; its
/// address is checked by `External::check_url` before the call.
pub fn external_client(policy: &External) -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(90))
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(Guarded(policy.clone())))
        .build()
        .expect("the HTTP client builds")
}

/// Resolves a name, keeping only the addresses external endpoints may be at.
struct Guarded(External);

impl Resolve for Guarded {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if policy.allows_host(&host) {
                return Ok(Box::new(found.into_iter()) as reqwest::dns::Addrs);
            }
            let (kept, refused): (Vec<SocketAddr>, Vec<SocketAddr>) = found
                .into_iter()
                .partition(|a| policy.refuses(a.ip()).is_none());
            if kept.is_empty() {
                // The addresses stay out of the message, which lands in the pool's status:
                // the operator is no name lookup service for a tenant's cluster survey.
                tracing::debug!(%host, ?refused, "every address of an external host is refused");
                return Err(format!(
                    "{host} resolves only to addresses external pools may not reach: ask the platform team to add it to the Helm value tenancy.external.allow"
                )
                .into());
            }
            Ok(Box::new(kept.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests;
