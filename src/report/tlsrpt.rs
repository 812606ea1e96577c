//! TLS-RPT (RFC 8460): counts of delivery sessions per policy domain and
//! UTC day, by result type.

use mail_auth::report::tlsrpt::{FailureDetails, PolicyDetails};

/// Per policy domain per UTC day: successful sessions and failures.
#[derive(Clone, Default)]
pub struct TlsRptCounts {}

impl TlsRptCounts {
    /// One session that met `policy`.
    pub fn success(&self, policy: &PolicyDetails) {
        let _ = policy;
    }

    /// One session that failed `policy` as `detail` says
    /// (`failed_session_count` is ignored: this is one session).
    pub fn failure(&self, policy: &PolicyDetails, detail: FailureDetails) {
        let _ = (policy, detail);
    }
}
