//! What a certificate says about itself, for a postmaster to read: the
//! subject's common name, the DNS names it is valid for, the issuer and the
//! validity period.
//!
//! Only the DER structure of RFC 5280 §4.1 is walked (Certificate →
//! tbsCertificate → issuer, validity, subject, extensions → subjectAltName);
//! nothing here decides whether a certificate is valid — rustls and
//! `deliver::dane` do that. Anything unexpected leaves a field empty.

use crate::deliver::cert::der_next as next;
use serde::Serialize;

/// The readable parts of one certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CertSummary {
    /// The subject's common name (CN), if any.
    pub subject: Option<String>,
    /// DNS names and IP addresses of the subjectAltName extension.
    pub names: Vec<String>,
    /// The issuer's common name (CN), if any.
    pub issuer: Option<String>,
    /// Unix seconds.
    #[serde(skip)]
    pub not_before: Option<i64>,
    /// Unix seconds.
    #[serde(skip)]
    pub not_after: Option<i64>,
    /// Issuer and subject are the same name.
    pub self_signed: bool,
}

impl CertSummary {
    /// Reads `der`; a certificate it cannot walk gives an empty summary.
    pub fn parse(der: &[u8]) -> CertSummary {
        parse(der).unwrap_or_default()
    }

    /// The names it is for, for a sentence: `mx1.example.com, mx2.example.com`
    /// (the CN when there is no subjectAltName).
    pub fn names_text(&self) -> String {
        if !self.names.is_empty() {
            self.names.join(", ")
        } else {
            self.subject.clone().unwrap_or_else(|| "no name".into())
        }
    }
}

/// `2026-12-08T10:00:00Z` for Unix seconds.
pub fn rfc3339(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{secs} s after 1970"))
}

/// `2.5.4.3`, commonName.
const OID_CN: &[u8] = &[0x55, 0x04, 0x03];
/// `2.5.29.17`, subjectAltName.
const OID_SAN: &[u8] = &[0x55, 0x1d, 0x11];

fn parse(der: &[u8]) -> Option<CertSummary> {
    let (tag, certificate, _) = next(der)?;
    expect(tag, 0x30)?;
    let (tag, tbs, _) = next(certificate)?;
    expect(tag, 0x30)?;
    let (mut tag, _, mut rest) = next(tbs)?;
    if tag == 0xa0 {
        // [0] EXPLICIT version; the serial number follows.
        (tag, _, rest) = next(rest)?;
    }
    expect(tag, 0x02)?;
    let (_, _, rest) = next(rest)?; // signature algorithm
    let (tag, issuer, rest) = next(rest)?;
    expect(tag, 0x30)?;
    let (tag, validity, rest) = next(rest)?;
    expect(tag, 0x30)?;
    let (tag, subject, mut rest) = next(rest)?;
    expect(tag, 0x30)?;
    let (t1, before, after) = next(validity)?;
    let (t2, after, _) = next(after)?;
    let mut summary = CertSummary {
        subject: common_name(subject),
        issuer: common_name(issuer),
        not_before: time_of(t1, before),
        not_after: time_of(t2, after),
        self_signed: issuer == subject,
        names: Vec::new(),
    };
    // subjectPublicKeyInfo, then optional [1] [2] unique ids and [3] extensions.
    while !rest.is_empty() {
        let (tag, value, more) = next(rest)?;
        rest = more;
        if tag == 0xa3 {
            summary.names = alt_names(value).unwrap_or_default();
        }
    }
    Some(summary)
}

fn expect(tag: u8, want: u8) -> Option<()> {
    (tag == want).then_some(())
}

/// The first CN of a Name (SEQUENCE OF SET OF AttributeTypeAndValue).
fn common_name(mut name: &[u8]) -> Option<String> {
    while !name.is_empty() {
        let (_, set, rest) = next(name)?;
        name = rest;
        let mut set = set;
        while !set.is_empty() {
            let (_, atv, more) = next(set)?;
            set = more;
            let (tag, oid, value) = next(atv)?;
            if tag == 0x06 && oid == OID_CN {
                let (_, text, _) = next(value)?;
                return Some(String::from_utf8_lossy(text).into_owned());
            }
        }
    }
    None
}

/// The dNSName and iPAddress entries of the subjectAltName extension, from
/// `[3] EXPLICIT Extensions`.
fn alt_names(extensions: &[u8]) -> Option<Vec<String>> {
    let (_, mut list, _) = next(extensions)?;
    while !list.is_empty() {
        let (_, ext, rest) = next(list)?;
        list = rest;
        let (tag, oid, mut fields) = next(ext)?;
        if tag != 0x06 || oid != OID_SAN {
            continue;
        }
        let (mut tag, mut value, more) = next(fields)?;
        if tag == 0x01 {
            // critical BOOLEAN
            fields = more;
            (tag, value, _) = next(fields)?;
        }
        expect(tag, 0x04)?;
        let (_, mut general_names, _) = next(value)?;
        let mut names = Vec::new();
        while !general_names.is_empty() {
            let (tag, value, rest) = next(general_names)?;
            general_names = rest;
            match tag {
                0x82 => names.push(String::from_utf8_lossy(value).into_owned()),
                0x87 if value.len() == 4 => {
                    let b: [u8; 4] = value.try_into().ok()?;
                    names.push(std::net::Ipv4Addr::from(b).to_string());
                }
                0x87 if value.len() == 16 => {
                    let b: [u8; 16] = value.try_into().ok()?;
                    names.push(std::net::Ipv6Addr::from(b).to_string());
                }
                _ => {}
            }
        }
        return Some(names);
    }
    Some(Vec::new())
}

/// UTCTime (`YYMMDDHHMMSSZ`, RFC 5280 §4.1.2.5.1: years 50–99 are 19xx)
/// or GeneralizedTime (`YYYYMMDDHHMMSSZ`) as Unix seconds.
fn time_of(tag: u8, value: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(value).ok()?.strip_suffix('Z')?;
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (year, rest) = match (tag, text.len()) {
        (0x17, 12) => {
            let yy: i32 = text[..2].parse().ok()?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &text[2..])
        }
        (0x18, 14) => (text[..4].parse().ok()?, &text[4..]),
        _ => return None,
    };
    let n = |i: usize| rest[i..i + 2].parse::<u8>().ok();
    let month = time::Month::try_from(n(0)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, n(2)?).ok()?;
    let t = time::Time::from_hms(n(4)?, n(6)?, n(8)?).ok()?;
    Some(
        time::PrimitiveDateTime::new(date, t)
            .assume_utc()
            .unix_timestamp(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_names_issuer_and_dates() {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec!["mx1.example.com".into(), "192.0.2.7".into()])
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "mx1.example.com");
        params.not_before = rcgen::date_time_ymd(2019, 1, 1);
        params.not_after = rcgen::date_time_ymd(2020, 1, 1);
        let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
        let s = CertSummary::parse(leaf.der());
        assert_eq!(s.subject.as_deref(), Some("mx1.example.com"));
        assert_eq!(s.issuer.as_deref(), Some("Test CA"));
        assert_eq!(s.names, vec!["mx1.example.com", "192.0.2.7"]);
        assert_eq!(s.not_before, Some(1_546_300_800));
        assert_eq!(s.not_after, Some(1_577_836_800));
        assert_eq!(rfc3339(1_577_836_800), "2020-01-01T00:00:00Z");
        assert!(!s.self_signed);
        assert!(CertSummary::parse(ca.der()).self_signed);
        assert_eq!(CertSummary::parse(b"junk"), CertSummary::default());
        assert_eq!(
            CertSummary::parse(&leaf.der()[..60]),
            CertSummary::default()
        );
    }
}
