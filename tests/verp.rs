//! VERP return paths: with `[bounces] return_path_domain`, each recipient's
//! copy leaves with its own envelope sender `bounces+TOKEN@domain`, whose
//! token names the message and the recipient.

mod common;

use std::time::Duration;

use common::relay::{OneTest, one_test, queue_id};
use herald::queue::QueueId;
use herald::verp::Verp;

const WAIT: Duration = Duration::from_secs(20);
const SECRET: &str = "test-verp-secret-0123456789";

fn invoice(to: &str) -> Vec<u8> {
    format!(
        "From: Acme Billing <billing@acme.test>\r\n\
         To: {to}\r\n\
         Subject: Invoice 42\r\n\
         \r\n\
         Dear customer, please find invoice 42.\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_recipient_gets_its_own_authenticated_return_path() {
    common::within(Duration::from_secs(60), "VERP delivery", async {
        let OneTest {
            dns: _dns,
            mx,
            relay,
        } = one_test(|setup| {
            setup.extra = format!(
                "[bounces]\nreturn_path_domain = \"bounces.relay.test\"\nverp_secret = \"{SECRET}\"\n"
            );
        })
        .await;

        let rcpts = ["a@one.test", "b@one.test"];
        let reply = relay
            .submit(
                "billing@acme.test",
                &rcpts,
                &invoice("a@one.test, b@one.test"),
            )
            .await;
        let id: QueueId = queue_id(&reply).parse().unwrap();

        let got = mx.wait_for_messages(2, WAIT);
        let verp = Verp::new("bounces.relay.test", SECRET.as_bytes());
        let mut seen = Vec::new();
        for m in &got {
            assert_eq!(m.rcpts.len(), 1, "one recipient per transaction: {m:?}");
            let (got_id, index) = verp
                .decode(&m.from)
                .unwrap_or_else(|| panic!("{} is not a VERP address of the relay", m.from));
            assert_eq!(got_id, id);
            assert_eq!(m.rcpts[0], rcpts[index], "the token names the recipient");
            seen.push(index);
        }
        seen.sort();
        assert_eq!(seen, [0, 1]);
    })
    .await;
}
