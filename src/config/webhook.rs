//! A tenant's `webhook_url`, parsed and checked at load (the webhook
//! sender is `report::webhook`).

/// Where a tenant's webhooks go, parsed from `webhook_url` at config load.
#[derive(Clone, Debug)]
pub struct Target {
    pub https: bool,
    pub host: String,
    pub port: u16,
    /// `Host` header value.
    pub authority: String,
    pub path_and_query: String,
}

impl Target {
    /// Parses an `http://` or `https://` URL without user info.
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: hyper::Uri = url
            .parse()
            .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(format!("{url:?} must start with http:// or https://")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{url:?} has no host"))?
            .as_str()
            .to_string();
        if authority.contains('@') {
            return Err(format!(
                "{url:?}: user info in the URL is not supported; the signature authenticates herald"
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| format!("{url:?} has no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        Ok(Target {
            https,
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            host,
            authority,
            path_and_query: uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
        })
    }
}
