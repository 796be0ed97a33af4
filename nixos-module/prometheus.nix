# services.proxy.prometheus: proxyd's alerting rules and a scrape job of its admin listener
# for a Prometheus server on the same host (services.prometheus).
{ config, lib, ... }:

let
  inherit (lib) mkEnableOption mkIf mkMerge;
  cfg = config.services.proxy;
  admin = cfg.settings.server.admin_listen;
in
{
  options.services.proxy.prometheus = {
    rules = mkEnableOption ''
      proxyd's alerting rules (the project's {file}`contrib/prometheus/alerts.yml`) in
      {option}`services.prometheus.ruleFiles`
    '';
    scrape = mkEnableOption ''
      a scrape job named `proxy` (the name the rules expect) for `/metrics` on
      {option}`services.proxy.settings.server.admin_listen`, in
      {option}`services.prometheus.scrapeConfigs`
    '';
  };

  config = mkIf cfg.enable (mkMerge [
    (mkIf cfg.prometheus.rules {
      services.prometheus.ruleFiles = [ ../contrib/prometheus/alerts.yml ];
    })
    (mkIf cfg.prometheus.scrape {
      assertions = [{
        assertion = admin != "";
        message = "services.proxy.prometheus.scrape needs the admin listener (services.proxy.settings.server.admin_listen is \"\").";
      }];
      services.prometheus.scrapeConfigs = [{
        job_name = "proxy";
        static_configs = [{ targets = [ admin ]; }];
      }];
    })
  ]);
}
