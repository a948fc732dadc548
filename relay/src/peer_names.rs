//! Which hosts a client may report watermarks for, from its TLS client certificate
//! (`tls.reports_only_for_certificate_names`) and its Forward user name
//! (`security.reports_only_for_usernames`).

use tokio_rustls::rustls::pki_types::CertificateDer;

/// The host names a connection's watermark reports may speak for.
#[derive(Debug, Clone, PartialEq)]
pub enum ReportHosts {
    /// No binding configured: any host (the shared key and TLS still decide who gets in).
    Any,
    /// The certificate's subjectAltName DNS names, lower-cased.
    Named(Vec<String>),
}

impl ReportHosts {
    /// The names the client certificate (the first of the chain) carries; none when it has no
    /// subjectAltName DNS names or cannot be parsed, so such a client can report for no host.
    pub fn of_certificate(cert: Option<&CertificateDer<'_>>) -> Self {
        let names = cert
            .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
            .map(|c| c.valid_dns_names().map(str::to_ascii_lowercase).collect())
            .unwrap_or_default();
        ReportHosts::Named(names)
    }

    /// Narrowed to `name` (the client's user name): it may report for that host only, and only
    /// if the certificate binding, when there is one, allows it too.
    pub fn only(self, name: &str) -> Self {
        if self.allows(name) {
            ReportHosts::Named(vec![name.to_ascii_lowercase()])
        } else {
            ReportHosts::Named(Vec::new())
        }
    }

    pub fn allows(&self, host: &str) -> bool {
        match self {
            ReportHosts::Any => true,
            ReportHosts::Named(names) => names.iter().any(|n| n.eq_ignore_ascii_case(host)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_names_of_the_certificate_are_allowed() {
        let named = ReportHosts::Named(vec!["web-7.example".into()]);
        assert!(named.allows("web-7.example") && named.allows("WEB-7.example"));
        assert!(!named.allows("web-8.example"));
        assert!(ReportHosts::Any.allows("anything"));
        // Bound to a user name as well: that name only, if the certificate names it.
        assert_eq!(ReportHosts::Any.only("Web-7.example"), ReportHosts::Named(vec!["web-7.example".into()]));
        assert!(!ReportHosts::Any.only("web-7.example").allows("web-8.example"));
        assert_eq!(named.clone().only("web-8.example"), ReportHosts::Named(vec![]));
        assert!(named.only("web-7.example").allows("web-7.example"));
        // A certificate that cannot be read names nobody.
        let garbage = CertificateDer::from(vec![0u8; 16]);
        assert_eq!(ReportHosts::of_certificate(Some(&garbage)), ReportHosts::Named(vec![]));
        assert_eq!(ReportHosts::of_certificate(None), ReportHosts::Named(vec![]));
    }
}
