//! `config_load`: [`Config::from_toml_str`] on arbitrary text. Config is
//! not network input, but an operator's typo must get an error that names
//! its key, never a panic.

use herald::config::Config;

pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml_str(text) {
        Ok(cfg) => {
            // A config that loads has the listeners and names herald uses.
            let _ = cfg.helo_name();
            let _ = cfg.needs_tls();
            let _ = cfg.dns.nameserver_addrs();
        }
        Err(errs) => {
            assert!(!errs.0.is_empty(), "an Err without any error");
            for e in &errs.0 {
                assert!(!e.path.is_empty(), "config error without a key path: {e}");
                assert!(
                    !e.message.is_empty(),
                    "config error without a message at {}",
                    e.path
                );
            }
            // Shown to the operator as one text: must not panic either.
            let _ = errs.to_string();
        }
    }
}
