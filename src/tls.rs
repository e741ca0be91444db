//! Start-up checks of the Kafka TLS and SASL settings, so that a bad
//! certificate or credential stops the relay with a message naming the
//! setting and the fix, instead of librdkafka's retries in the log.
//!
//! - Before connecting: every configured certificate file must be readable
//!   PEM and valid now ([`check_files`]).
//! - After a failed first connection: librdkafka's last error is matched
//!   against the handshake and authentication failures it reports
//!   ([`explain`]).

use std::path::Path;

use openssl::asn1::Asn1Time;
use openssl::x509::X509;

use crate::config::KafkaSettings;

/// Checks the certificate files the Kafka settings name.
pub fn check_files(k: &KafkaSettings) -> Result<(), String> {
    let Some(tls) = &k.tls else { return Ok(()) };
    if let Some(p) = &tls.ca_location {
        check_certificates("kafka.tls.ca_location", p)?;
    }
    if let Some(p) = &tls.certificate_location {
        check_certificates("kafka.tls.certificate_location", p)?;
        if tls.key_location.is_none() {
            return Err(
                "kafka.tls.key_location: not set, but kafka.tls.certificate_location is; \
                 give the client certificate's private key"
                    .into(),
            );
        }
    }
    if let Some(p) = &tls.key_location {
        std::fs::metadata(p).map_err(|e| {
            format!(
                "kafka.tls.key_location: cannot read {}: {e}; point it at the client \
                 certificate's private key (PEM)",
                p.display()
            )
        })?;
    }
    Ok(())
}

fn check_certificates(setting: &str, path: &Path) -> Result<(), String> {
    let pem = std::fs::read(path).map_err(|e| {
        format!(
            "{setting}: cannot read {}: {e}; point it at a PEM certificate file",
            path.display()
        )
    })?;
    let certs = X509::stack_from_pem(&pem).map_err(|e| {
        format!(
            "{setting}: {} is not a PEM certificate file ({e})",
            path.display()
        )
    })?;
    if certs.is_empty() {
        return Err(format!(
            "{setting}: {} holds no certificate (expected -----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    let now = Asn1Time::days_from_now(0).map_err(|e| e.to_string())?;
    for cert in &certs {
        let subject = subject_of(cert);
        if cert.not_after() < now {
            return Err(format!(
                "{setting}: the certificate {subject} in {} expired on {}; renew it (or point \
                 {setting} at the current one)",
                path.display(),
                cert.not_after()
            ));
        }
        if cert.not_before() > now {
            return Err(format!(
                "{setting}: the certificate {subject} in {} is not valid before {}; check the \
                 clock or the certificate",
                path.display(),
                cert.not_before()
            ));
        }
    }
    Ok(())
}

fn subject_of(cert: &X509) -> String {
    cert.subject_name()
        .entries()
        .map(|e| {
            format!(
                "{}={}",
                e.object().nid().short_name().unwrap_or("?"),
                e.data().to_string().unwrap_or_default()
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The setting and fix behind a librdkafka connection error, when it is a
/// TLS or SASL failure that no retry fixes.
pub fn explain(k: &KafkaSettings, error: &str) -> Option<String> {
    let lower = error.to_ascii_lowercase();
    let ca = k
        .tls
        .as_ref()
        .and_then(|t| t.ca_location.as_ref())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the system's CA store".into());
    if lower.contains("sasl authentication error") || lower.contains("authentication failed") {
        let user = k.sasl.as_ref().map(|s| s.username.as_str()).unwrap_or("");
        return Some(format!(
            "kafka.sasl.password: the broker refused the credentials of user `{user}` \
             (kafka.sasl.username, kafka.sasl.mechanism {}): {error}; check the password \
             and that the user exists for this mechanism",
            k.sasl
                .as_ref()
                .map(|s| s.mechanism.as_str())
                .unwrap_or("unset")
        ));
    }
    if lower.contains("certificate verify failed") || lower.contains("could not be verified") {
        return Some(format!(
            "kafka.tls.ca_location: the broker's certificate is not signed by a CA in {ca}: \
             {error}; point kafka.tls.ca_location at the CA that signed the brokers' certificates"
        ));
    }
    if lower.contains("expired") {
        return Some(format!(
            "kafka.tls.ca_location: a certificate of the TLS handshake has expired: {error}; \
             renew the brokers' certificates or the CA in {ca}"
        ));
    }
    if lower.contains("ssl handshake failed") || lower.contains("wrong version number") {
        return Some(format!(
            "kafka.security_protocol: the TLS handshake with the brokers failed: {error}; check \
             that kafka.brokers are TLS listeners (security_protocol `{}`) and kafka.tls",
            k.security_protocol
        ));
    }
    None
}
