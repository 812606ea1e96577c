//! A DNS server on loopback for the SMTP session target: it answers every
//! UDP query at once from the name alone, so RCPT TO gets the verdict the
//! fuzzer's domain asks for without a timeout in the way. `*.tempfail.test`
//! gets SERVFAIL, `*.nx.test` NXDOMAIN, `nullmx.test` a null MX (RFC 7505);
//! every other name has an MX (itself, preference 10) and the A record
//! 127.0.0.2; other types get an empty NOERROR answer.

use std::net::SocketAddr;

use tokio::net::UdpSocket;

const MX: u16 = 15;
const A: u16 = 1;
const SERVFAIL: u8 = 2;
const NXDOMAIN: u8 = 3;

/// Binds and serves on the current runtime; returns the address.
pub async fn start() -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind UDP 127.0.0.1:0");
    let addr = sock.local_addr().expect("local addr");
    tokio::spawn(async move {
        let mut buf = [0u8; 1500];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                continue;
            };
            if let Some(resp) = answer(&buf[..n]) {
                let _ = sock.send_to(&resp, peer).await;
            }
        }
    });
    addr
}

/// The response to one query (RFC 1035 §4.1), or `None` for anything that
/// is not a single plain question.
fn answer(q: &[u8]) -> Option<Vec<u8>> {
    if q.len() < 12 || q[4..6] != [0, 1] {
        return None;
    }
    let mut pos = 12;
    let mut name = String::new();
    loop {
        let len = *q.get(pos)? as usize;
        pos += 1;
        if len == 0 {
            break;
        }
        if len & 0xC0 != 0 {
            return None;
        }
        let label = q.get(pos..pos + len)?;
        pos += len;
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(&String::from_utf8_lossy(label).to_ascii_lowercase());
    }
    let qtype = u16::from_be_bytes(q.get(pos..pos + 2)?.try_into().ok()?);
    let question_end = pos + 4;
    let question = q.get(12..question_end)?;

    let (rcode, rdata): (u8, Option<Vec<u8>>) = if name.ends_with("tempfail.test") {
        (SERVFAIL, None)
    } else if name.ends_with("nx.test") {
        (NXDOMAIN, None)
    } else {
        match qtype {
            // Preference 0, exchange "." (the root).
            MX if name == "nullmx.test" => (0, Some(vec![0, 0, 0])),
            // Preference 10, exchange: a pointer to the question's name.
            MX => (0, Some(vec![0, 10, 0xC0, 0x0C])),
            A => (0, Some(vec![127, 0, 0, 2])),
            _ => (0, None),
        }
    };
    let mut r = Vec::with_capacity(question_end + 32);
    r.extend_from_slice(&q[..2]);
    // QR, the query's opcode, AA, the query's RD; then RA and the rcode.
    r.push(0x80 | (q[2] & 0x78) | 0x04 | (q[2] & 0x01));
    r.push(0x80 | rcode);
    r.extend_from_slice(&[0, 1, 0, u8::from(rdata.is_some()), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if let Some(rdata) = rdata {
        r.extend_from_slice(&[0xC0, 0x0C]);
        r.extend_from_slice(&qtype.to_be_bytes());
        r.extend_from_slice(&[0, 1, 0, 0, 0, 60]);
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(&rdata);
    }
    Some(r)
}
