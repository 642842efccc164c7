//! The one integration-test binary: black-box tests against a real server on a loopback
//! port and fake model servers over real HTTP.

mod support;

mod answers;
mod api;
mod bench;
mod boundaries;
mod client;
mod conformance;
mod conversation;
mod crash;
mod dashboard;
mod economy;
mod expiry;
mod faults;
mod gateway;
mod hardening;
mod lifecycle;
mod llamacpp;
mod models;
mod run;
mod sdk;
mod stress;
mod timers;
mod tls;
mod tools;
mod watch;
mod webhooks;
