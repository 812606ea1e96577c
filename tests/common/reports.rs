//! Reports a remote mail system sends back to herald's return path.

/// A Postfix-style RFC 3464 report from `mx.one.test` to `return_path`
/// about one recipient; `diagnostic` is what follows `smtp; ` (no
/// Diagnostic-Code field when `None`), `message_id` the returned headers'
/// (none returned when `None`).
pub struct Dsn<'a> {
    pub return_path: &'a str,
    pub to: &'a str,
    pub action: &'a str,
    pub status: &'a str,
    pub diagnostic: Option<&'a str>,
    pub message_id: Option<&'a str>,
}

impl Dsn<'_> {
    pub fn bytes(&self) -> Vec<u8> {
        let Dsn {
            return_path,
            to,
            action,
            status,
            ..
        } = self;
        let diagnostic = self
            .diagnostic
            .map(|d| format!("Diagnostic-Code: smtp; {d}\r\n"))
            .unwrap_or_default();
        let returned = self
            .message_id
            .map(|m| {
                format!(
                    "--B1\r\nContent-Type: text/rfc822-headers\r\n\r\n\
                     From: billing@acme.test\r\nMessage-ID: {m}\r\n\r\n"
                )
            })
            .unwrap_or_default();
        format!(
            "From: MAILER-DAEMON@mx.one.test (Mail Delivery System)\r\n\
             To: {return_path}\r\n\
             Subject: Undelivered Mail Returned to Sender\r\n\
             Auto-Submitted: auto-replied\r\n\
             MIME-Version: 1.0\r\n\
             Content-Type: multipart/report; report-type=delivery-status; boundary=\"B1\"\r\n\
             \r\n\
             --B1\r\n\
             Content-Type: text/plain\r\n\
             \r\n\
             I'm sorry to have to inform you that your message could not be delivered.\r\n\
             \r\n\
             --B1\r\n\
             Content-Type: message/delivery-status\r\n\
             \r\n\
             Reporting-MTA: dns; mx.one.test\r\n\
             \r\n\
             Final-Recipient: rfc822; {to}\r\n\
             Action: {action}\r\n\
             Status: {status}\r\n\
             Remote-MTA: dns; store.one.test\r\n\
             {diagnostic}\
             \r\n\
             {returned}\
             --B1--\r\n"
        )
        .into_bytes()
    }
}
